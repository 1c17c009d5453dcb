// Package obs serves what both processes expose over HTTP: Prometheus metrics, liveness and
// readiness probes on the metrics listener; the config, pprof and the kernel's explain on the
// admin listener.
package obs

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// Label quotes a Prometheus label value.
func Label(s string) string {
	b := make([]byte, 0, len(s)+2)
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\\':
			b = append(b, '\\', '\\')
		case '"':
			b = append(b, '\\', '"')
		case '\n':
			b = append(b, '\\', 'n')
		default:
			b = append(b, c)
		}
	}
	return string(append(b, '"'))
}

// Readiness reports whether the process is ready and, in detail, why or why not; detail is
// written as the JSON body of /health/ready.
type Readiness func() (ready bool, detail any)

// Options configure the metrics listener: what Prometheus and the kubelet's probes read.
type Options struct {
	Sets  func() []*metrics.Set // the process's metric sets, read at every scrape
	Ready Readiness
	// ProcessMetrics adds the default set, Go runtime and process metrics.
	ProcessMetrics bool
	// Families describe the process's own metric families, for the HELP and TYPE lines.
	Families []Family
	// NoMetrics leaves /metrics out (the health probes stay).
	NoMetrics bool
}

// Handler returns the HTTP handler of the metrics listener: /metrics, /health/live and
// /health/ready. What tells more than a probe needs (the config, profiles, explain) is on the
// admin listener (AdminHandler), bound to loopback by default.
func Handler(o Options) http.Handler {
	mux := http.NewServeMux()
	if !o.NoMetrics {
		fams := familyIndex(o.Families)
		mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
			WriteMetrics(w, fams, o.Sets, o.ProcessMetrics)
		})
	}
	mux.HandleFunc("/health/live", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "live"})
	})
	mux.HandleFunc("/health/ready", func(w http.ResponseWriter, _ *http.Request) {
		ready, detail := true, any(map[string]string{"status": "ready"})
		if o.Ready != nil {
			ready, detail = o.Ready()
		}
		code := http.StatusOK
		if !ready {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, detail)
	})
	return mux
}

// AdminOptions configure the admin listener.
type AdminOptions struct {
	// Config returns the config in force, secrets redacted, for /config (JSON); nil leaves
	// /config out.
	Config func() any
	Pprof  bool
	// Routes are more handlers by path (the kernel's /debug/explain).
	Routes map[string]http.Handler
}

// AdminHandler returns the HTTP handler of the admin listener: /config, /debug/pprof/ when
// enabled, and o.Routes.
func AdminHandler(o AdminOptions) http.Handler {
	mux := http.NewServeMux()
	if o.Config != nil {
		mux.HandleFunc("/config", func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodGet && r.Method != http.MethodHead {
				w.Header().Set("Allow", "GET, HEAD")
				writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "read-only: use GET"})
				return
			}
			w.Header().Set("Cache-Control", "no-store")
			writeJSON(w, http.StatusOK, o.Config())
		})
	}
	if o.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	for path, h := range o.Routes {
		mux.Handle(path, h)
	}
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// Server is a running HTTP listener.
type Server struct {
	srv *http.Server
	ln  net.Listener
}

// Listen starts serving h on addr.
func Listen(addr string, h http.Handler) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &Server{srv: &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}, ln: ln}
	go func() { _ = s.srv.Serve(ln) }()
	return s, nil
}

// Addr returns the address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops the server, waiting briefly for open requests.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return s.srv.Close()
	}
	return nil
}

// Family is a metric family: its name, Prometheus type (counter, gauge, histogram) and help.
type Family struct {
	Name, Type, Help string
}

// familyIndex maps family names to their descriptions, the process's own over the built-in
// descriptions of the Go runtime and process metrics.
func familyIndex(own []Family) map[string]Family {
	m := make(map[string]Family, len(own)+len(runtimeFamilies))
	for _, f := range runtimeFamilies {
		m[f.Name] = f
	}
	for _, f := range own {
		m[f.Name] = f
	}
	return m
}

var scrapeBufPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// maxPooledScrape caps the buffers kept for the next scrape.
const maxPooledScrape = 1 << 20

// WriteMetrics writes the sets (and, when process is set, the Go runtime and process metrics)
// in the Prometheus text format with a HELP line for every family and a TYPE line for the
// families that fams describes, each family's samples together. VictoriaMetrics/metrics
// writes samples only; Prometheus's linter (promtool check metrics) wants every family
// described, and the runtime families it writes carry no type we could vouch for, so they are
// left untyped.
func WriteMetrics(w io.Writer, fams map[string]Family, sets func() []*metrics.Set, process bool) {
	buf := scrapeBufPool.Get().(*bytes.Buffer)
	defer func() {
		if buf.Cap() <= maxPooledScrape {
			buf.Reset()
			scrapeBufPool.Put(buf)
		}
	}()
	if sets != nil {
		for _, s := range sets() {
			s.WritePrometheus(buf)
		}
	}
	if process {
		metrics.WritePrometheus(buf, true)
	}
	type group struct {
		fam   Family
		lines []string
	}
	var order []*group
	byName := map[string]*group{}
	for _, line := range strings.Split(buf.String(), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		f := familyOf(line, fams)
		g := byName[f.Name]
		if g == nil {
			g = &group{fam: f}
			byName[f.Name] = g
			order = append(order, g)
		}
		g.lines = append(g.lines, line)
	}
	var out bytes.Buffer
	for _, g := range order {
		out.WriteString("# HELP " + g.fam.Name + " " + escapeHelp(g.fam.Help) + "\n")
		if g.fam.Type != "" {
			out.WriteString("# TYPE " + g.fam.Name + " " + g.fam.Type + "\n")
		}
		for _, l := range g.lines {
			out.WriteString(l)
			out.WriteByte('\n')
		}
	}
	_, _ = w.Write(out.Bytes())
}

// familyOf returns the family of a sample line: a described family by its exact name or, for
// a histogram or summary, by the name without _bucket, _sum or _count; else an untyped family
// of the sample's own name.
func familyOf(line string, fams map[string]Family) Family {
	name := line
	if i := strings.IndexAny(line, "{ "); i >= 0 {
		name = line[:i]
	}
	if f, ok := fams[name]; ok {
		return f
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suffix)
		if !ok {
			continue
		}
		if f, ok := fams[base]; ok && (f.Type == "histogram" || f.Type == "summary") {
			return f
		}
	}
	help := "Process metric."
	switch {
	case strings.HasPrefix(name, "go_"):
		help = "Go runtime metric."
	case strings.HasPrefix(name, "process_"):
		help = "Operating system process metric."
	}
	return Family{Name: name, Help: help}
}

func escapeHelp(s string) string {
	return strings.NewReplacer("\\", "\\\\", "\n", "\\n").Replace(s)
}

// runtimeFamilies describe the Go runtime and process metrics that have a well-known meaning;
// the rest get a generic help text.
var runtimeFamilies = []Family{
	{Name: "go_goroutines", Help: "Number of goroutines."},
	{Name: "go_threads", Help: "Number of OS threads created."},
	{Name: "go_gomaxprocs", Help: "Value of GOMAXPROCS."},
	{Name: "go_memstats_alloc_bytes", Help: "Bytes of allocated heap objects."},
	{Name: "go_memstats_heap_inuse_bytes", Help: "Bytes in in-use heap spans."},
	{Name: "go_memstats_sys_bytes", Help: "Bytes of memory obtained from the OS."},
	{Name: "go_memlimit_bytes", Help: "Go runtime memory limit (GOMEMLIMIT)."},
	{Name: "go_gc_duration_seconds", Help: "Durations of garbage collection pauses."},
	{Name: "process_cpu_seconds_total", Help: "Total user and system CPU time spent, in seconds."},
	{Name: "process_resident_memory_bytes", Help: "Resident memory size in bytes."},
	{Name: "process_virtual_memory_bytes", Help: "Virtual memory size in bytes."},
	{Name: "process_start_time_seconds", Help: "Start time of the process since the Unix epoch, in seconds."},
	{Name: "process_open_fds", Help: "Number of open file descriptors."},
	{Name: "process_max_fds", Help: "Maximum number of open file descriptors."},
	{Name: "process_num_threads", Help: "Number of OS threads in the process."},
}
