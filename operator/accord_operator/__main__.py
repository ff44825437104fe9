from accord_operator.cli import main

raise SystemExit(main())
