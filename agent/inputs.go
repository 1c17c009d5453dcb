package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"slices"

	"github.com/policy-engine/policy-engine/internal/secrets"
	"github.com/policy-engine/policy-engine/internal/watch"
)

// inputs is what the config in force was built from: the config file's bytes and a digest of
// every file it names (secrets, key sets). A reload with the same bytes and the same digests is
// a no-op; a changed secret or key set file is a reload although the config is the same.
type inputs struct {
	data []byte
	// sums holds a digest per named file, never its contents (they may be secrets).
	sums map[string][sha256.Size]byte
	// tracing lists the files the tracing settings name: a change of one rebuilds the exporter.
	tracing []string
}

// fileKeys are the policy settings whose string value is the path of a file the agent reads
// when it builds the policy.
var fileKeys = map[string]bool{"jwks_file": true}

// namedFiles lists the files an agent config names, before its secret references are
// resolved: every ${file:/path} in the policies' settings and the tracing headers, and every
// setting in fileKeys.
func namedFiles(c *CoreConfig) (all, tracing []string) {
	seen := map[string]bool{}
	add := func(p string) {
		if !seen[p] {
			seen[p] = true
			all = append(all, p)
		}
	}
	var walk func(key string, v any)
	walk = func(key string, v any) {
		switch x := v.(type) {
		case string:
			if p, ok := secrets.FileRef(x); ok {
				add(p)
			} else if fileKeys[key] && x != "" {
				add(x)
			}
		case map[string]any:
			for k, e := range x {
				walk(k, e)
			}
		case []any:
			for _, e := range x {
				walk(key, e)
			}
		}
	}
	for _, raw := range c.Policies.Config {
		var v any
		if json.Unmarshal(raw, &v) == nil {
			walk("", v)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(c.Observability.Tracing.Headers)) {
		if p, ok := secrets.FileRef(c.Observability.Tracing.Headers[name]); ok {
			tracing = append(tracing, p)
			add(p)
		}
	}
	slices.Sort(all)
	return all, tracing
}

// digest reads each file and returns its digest; a file that cannot be read gets the digest of
// its error, so that its return is a change too.
func digest(files []string) map[string][sha256.Size]byte {
	sums := make(map[string][sha256.Size]byte, len(files))
	for _, p := range files {
		h := sha256.New()
		// Read as a secret is: a regular file of bounded size, opened without blocking, so that
		// a FIFO or a device named by a config can neither hang the load nor fill memory.
		data, err := secrets.ReadFile(p)
		if err == nil {
			h.Write(data)
		} else {
			h.Reset()
			fmt.Fprintf(h, "error: %v", err)
		}
		sums[p] = [sha256.Size]byte(h.Sum(nil))
	}
	return sums
}

// loadInputs reads, validates and resolves the agent config at path, and digests the files it
// names. files is what to watch: the config and the files it names, as far as it could be read.
func loadInputs(path string) (cfg *Config, in *inputs, files []string, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, []string{path}, fmt.Errorf("read agent config: %w", err)
	}
	cfg, err = ParseConfig(path, data)
	if err != nil {
		return nil, nil, []string{path}, err
	}
	named, tracing := namedFiles(cfg.AgentCore)
	files = append([]string{path}, named...)
	// Digested before the secrets are read: a change in between is seen by the next reload.
	in = &inputs{data: data, sums: digest(named), tracing: tracing}
	if err := resolveSecrets(path, cfg.AgentCore, secrets.OS); err != nil {
		return nil, nil, files, err
	}
	return cfg, in, files, nil
}

// same reports whether in was built from the same bytes and files as cur.
func (in *inputs) same(cur *inputs) bool {
	return bytes.Equal(in.data, cur.data) && maps.Equal(in.sums, cur.sums)
}

// changed lists the named files whose digest differs from cur's.
func (in *inputs) changed(cur *inputs) []string {
	var out []string
	for p, s := range in.sums {
		if c, ok := cur.sums[p]; !ok || c != s {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// watchFiles watches the config file and the files it names when -watch-config is on; nil
// (off) otherwise.
func watchFiles(ctx context.Context, f *flags, files []string) *watch.Watcher {
	if !f.watch {
		return nil
	}
	w := watch.New(f.watchEvery, files...)
	go w.Run(ctx)
	return w
}

// union returns the files of both lists once each, in order.
func union(a, b []string) []string {
	return slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(a), b...))))
}
