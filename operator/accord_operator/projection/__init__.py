"""CQRSProjection: read models kept up to date from an event stream."""
