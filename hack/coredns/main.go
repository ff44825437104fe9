// A CoreDNS with only the plugins a test cluster's DNS needs: the full build pulls in every
// cloud provider's SDK and takes several times as long to compile.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order plugins run in, a subset of CoreDNS's plugin.cfg in the same order.
var directives = []string{"errors", "log", "health", "ready", "cache", "loadbalance", "kubernetes"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
