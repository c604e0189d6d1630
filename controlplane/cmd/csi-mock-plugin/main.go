// Command csi-mock-plugin serves the Kubernetes project's mock CSI plugin
// (k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/mock, the plugin behind the e2e suite's
// "csi-mock" driver) on a unix socket, so that tests can talk to it as to any CSI plugin.
//
// The plugin keeps its volumes in memory. Its node id is its driver name: ControllerPublishVolume
// accepts only that node id. It starts with three volumes ("1", "2", "3") and creates more with
// CreateVolume.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"k8s.io/klog/v2"
	"k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/driver"
	"k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/mock/service"
)

func main() {
	klog.InitFlags(nil)
	endpoint := flag.String("endpoint", "", "unix socket to serve on, as unix:///path or /path")
	driverName := flag.String("drivername", service.Name, "the plugin's name; also its only node id")
	attachLimit := flag.Int64("attach-limit", 0, "volumes per node (0: no limit)")
	flag.Parse()

	path := strings.TrimPrefix(*endpoint, "unix://")
	if path == "" {
		fmt.Fprintln(os.Stderr, "--endpoint is required")
		os.Exit(2)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		fmt.Fprintf(os.Stderr, "removing stale socket %s: %v\n", path, err)
		os.Exit(1)
	}
	listener, err := net.Listen("unix", path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "listening on %s: %v\n", path, err)
		os.Exit(1)
	}

	svc := service.New(service.Config{DriverName: *driverName, AttachLimit: *attachLimit})
	plugin := driver.NewCSIDriver(&driver.CSIDriverServers{Controller: svc, Identity: svc, Node: svc})
	if err := plugin.Start(listener, nil); err != nil {
		fmt.Fprintf(os.Stderr, "starting the plugin: %v\n", err)
		os.Exit(1)
	}
	klog.Infof("mock CSI plugin %s serving on %s", *driverName, path)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
	plugin.Stop()
	_ = os.Remove(path)
}
