// Prepare/Commit/Remove latency for 1 000 snapshots: lazy-erofs through containerd's
// proxy client (the path containerd takes) vs containerd's built-in overlayfs
// snapshotter, same harness, same machine. A benchmark that prints figures; it runs
// only with LAZY_EROFS_BENCH=1 (packaging/bench.sh).
package conformance

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
)

const latencySnapshots = 1000

type timings map[string][]time.Duration

func (t timings) add(op string, d time.Duration) { t[op] = append(t[op], d) }

func percentile(ds []time.Duration, p float64) time.Duration {
	sorted := append([]time.Duration(nil), ds...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	return sorted[int(float64(len(sorted)-1)*p)]
}

// churn prepares, commits and removes latencySnapshots snapshots on one base layer.
func churn(ctx context.Context, sn snapshots.Snapshotter) (timings, error) {
	t := timings{}
	if _, err := sn.Prepare(ctx, "base-active", ""); err != nil {
		return nil, err
	}
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		return nil, err
	}
	for i := 0; i < latencySnapshots; i++ {
		key, name := fmt.Sprintf("active-%d", i), fmt.Sprintf("layer-%d", i)
		start := time.Now()
		if _, err := sn.Prepare(ctx, key, "base"); err != nil {
			return nil, err
		}
		t.add("Prepare", time.Since(start))
		start = time.Now()
		if err := sn.Commit(ctx, name, key); err != nil {
			return nil, err
		}
		t.add("Commit", time.Since(start))
	}
	for i := 0; i < latencySnapshots; i++ {
		start := time.Now()
		if err := sn.Remove(ctx, fmt.Sprintf("layer-%d", i)); err != nil {
			return nil, err
		}
		t.add("Remove", time.Since(start))
	}
	return t, nil
}

func rss(pid int) string {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "?"
	}
	var out []string
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmRSS:") || strings.HasPrefix(line, "VmHWM:") {
			out = append(out, strings.Join(strings.Fields(line), " "))
		}
	}
	return strings.Join(out, ", ")
}

func TestProxyLatency(t *testing.T) {
	if os.Getenv("LAZY_EROFS_BENCH") == "" {
		t.Skip("a benchmark: set LAZY_EROFS_BENCH=1")
	}
	ctx := namespaces.WithNamespace(context.Background(), "bench")
	results := map[string]timings{}

	dir := t.TempDir()
	sn, cleanup, pid, err := startDaemonProcess(dir + "/lazy")
	if err != nil {
		t.Fatal(err)
	}
	if results["lazy-erofs (proxy)"], err = churn(ctx, sn); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("lazy-erofs-snapshotter after %d snapshots: %s\n", latencySnapshots, rss(pid))
	if err := cleanup(); err != nil {
		t.Fatal(err)
	}

	ov, err := overlay.NewSnapshotter(dir + "/overlay")
	if err != nil {
		t.Fatal(err)
	}
	if results["overlayfs (built in)"], err = churn(ctx, ov); err != nil {
		t.Fatal(err)
	}
	ov.Close()

	fmt.Printf("%-22s %-8s %10s %10s\n", "snapshotter", "call", "p50", "p99")
	for _, target := range []string{"lazy-erofs (proxy)", "overlayfs (built in)"} {
		for _, op := range []string{"Prepare", "Commit", "Remove"} {
			ds := results[target][op]
			fmt.Printf("%-22s %-8s %10s %10s\n", target, op,
				percentile(ds, 0.50).Round(time.Microsecond), percentile(ds, 0.99).Round(time.Microsecond))
		}
	}
}
