// containerd's snapshotter conformance suite (snapshots/testsuite, from Debian's
// golang-github-containerd-containerd-dev) against lazy-erofs-snapshotter through
// containerd's own proxy client — the path containerd takes for a [proxy_plugins]
// entry. The suite creates a fresh root per subtest; each gets its own daemon.
//
// Run by packaging/conformance.sh (GOPATH mode, offline, as root).
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// startDaemon runs the snapshotter on root and returns a proxy client for it.
func startDaemon(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sn, cleanup, _, err := startDaemonProcess(root)
	return sn, cleanup, err
}

// startDaemonProcess is startDaemon that also returns the daemon's pid.
func startDaemonProcess(root string) (snapshots.Snapshotter, func() error, int, error) {
	bin := os.Getenv("LAZY_EROFS_SNAPSHOTTER")
	if bin == "" {
		return nil, nil, 0, fmt.Errorf("LAZY_EROFS_SNAPSHOTTER is not set")
	}
	sock := filepath.Join(root, "snapshotter.sock")
	logPath := filepath.Join(filepath.Dir(root), "snapshotter.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, 0, err
	}
	cmd := exec.Command(bin, "--root", root, "--address", sock, "--metrics-address=")
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(os.Environ(), "RUST_LOG=warn")
	if err := cmd.Start(); err != nil {
		return nil, nil, 0, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			log, _ := os.ReadFile(logPath)
			return nil, nil, 0, fmt.Errorf("snapshotter exited before serving: %v\n%s", err, log)
		default:
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return nil, nil, 0, fmt.Errorf("snapshotter did not serve %s within 20 s", sock)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// As containerd dials a proxy plugin. The authority is set because Debian's
	// grpc-go 1.33 would send the socket path, which HTTP/2 servers other than
	// grpc-go's reject; grpc-go >= 1.34 (containerd 1.7) sends "localhost" itself.
	conn, err := grpc.Dial(dialer.DialAddress(sock), grpc.WithInsecure(),
		grpc.WithAuthority("localhost"), grpc.WithContextDialer(dialer.ContextDialer))
	if err != nil {
		cmd.Process.Kill()
		return nil, nil, 0, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazy-erofs")
	cleanup := func() error {
		sn.Close()
		conn.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			logFile.Close()
			if err != nil {
				log, _ := os.ReadFile(logPath)
				return fmt.Errorf("snapshotter did not stop cleanly on SIGTERM: %v\n%s", err, log)
			}
			return nil
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			return fmt.Errorf("snapshotter ignored SIGTERM for 10 s")
		}
	}
	return sn, cleanup, cmd.Process.Pid, nil
}

func TestLazyErofsConformance(t *testing.T) {
	testsuite.SnapshotterSuite(t, "lazy-erofs", startDaemon)
}
