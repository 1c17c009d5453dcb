package agent

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// TestNamedFiles: the files an agent config names are its ${file:} secrets (at any depth of
// the policies' settings, and in the tracing headers) and its jwks_file settings; a change of
// one is a change of the config's inputs, and the digests never hold the contents.
func TestNamedFiles(t *testing.T) {
	dir := t.TempDir()
	key, jwks, hdr := filepath.Join(dir, "key"), filepath.Join(dir, "jwks.json"), filepath.Join(dir, "hdr")
	for _, p := range []string{key, jwks, hdr} {
		if err := os.WriteFile(p, []byte("secret-1"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfgFile := filepath.Join(dir, "agent.yaml")
	yaml := `agent_core:
  name: a
  socket_path: /tmp/a.sock
  policies:
    config:
      apiKeyAuth:
        keys:
          - key: "${file:` + key + `}"
            user_id: u
          - key: "$${file:/not/a/ref}"
            user_id: v
      jwtValidation:
        jwks_file: ` + jwks + `
  observability:
    tracing:
      headers:
        authorization: "${file:` + hdr + `}"
`
	if err := os.WriteFile(cfgFile, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, in, files, err := loadInputs(cfgFile)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{cfgFile, hdr, jwks, key}
	slices.Sort(want[1:])
	if !slices.Equal(files, want) {
		t.Fatalf("files %q, want %q", files, want)
	}
	if !slices.Equal(in.tracing, []string{hdr}) {
		t.Fatalf("tracing files %q", in.tracing)
	}
	if string(cfg.AgentCore.Policies.Config["apiKeyAuth"]) == "" {
		t.Fatal("settings lost")
	}
	_, same, _, _ := loadInputs(cfgFile)
	if !same.same(in) || len(same.changed(in)) != 0 {
		t.Fatal("the same files are a change")
	}
	os.WriteFile(key, []byte("secret-2"), 0o600)
	_, next, _, _ := loadInputs(cfgFile)
	if next.same(in) || !slices.Equal(next.changed(in), []string{key}) {
		t.Fatalf("changed %q, want the key file", next.changed(in))
	}
	os.Remove(jwks) // a file that cannot be read is a change too, and its return another
	gone := &inputs{data: in.data, sums: digest([]string{hdr, jwks, key})}
	if !slices.Contains(gone.changed(next), jwks) {
		t.Fatal("a removed file is not a change")
	}
	// A config whose secret is missing fails, but still names the file to watch.
	os.Remove(key)
	if _, _, files, err := loadInputs(cfgFile); err == nil || !slices.Contains(files, key) {
		t.Fatalf("err %v, files %q", err, files)
	}
}

func TestWatchFlags(t *testing.T) {
	f, err := parseFlags(nil, io.Discard)
	if err != nil || !f.watch || f.watchEvery != time.Second {
		t.Fatalf("defaults: %+v, %v", f, err)
	}
	if f, err := parseFlags([]string{"-watch-config=false"}, io.Discard); err != nil || f.watch {
		t.Fatalf("off: %+v, %v", f, err)
	}
	if _, err := parseFlags([]string{"-watch-interval", "0s"}, io.Discard); err == nil {
		t.Fatal("a zero interval was accepted")
	}
}
