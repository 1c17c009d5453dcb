package ops

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/policy-engine/policy-engine/kernel"
)

// loadBootstrap decodes an Envoy YAML bootstrap strictly: unknown fields and unresolvable
// typed configs are errors, as they are for Envoy.
func loadBootstrap(path string) (*bootstrapv3.Bootstrap, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var doc any
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	j, err := json.Marshal(doc)
	if err != nil {
		return nil, err
	}
	var bs bootstrapv3.Bootstrap
	if err := (protojson.UnmarshalOptions{}).Unmarshal(j, &bs); err != nil {
		return nil, fmt.Errorf("decode %s as an Envoy bootstrap: %w", path, err)
	}
	return &bs, nil
}

// validateDeep runs each message's protoc-gen-validate rules (Envoy's own config checks), also
// inside every typed config (Any), which the generated validators do not enter.
func validateDeep(m proto.Message, path string) error {
	var errs []error
	if v, ok := m.(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", path, err))
		}
	}
	if a, ok := m.(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		return validateDeep(inner, path+"("+a.GetTypeUrl()+")")
	}
	m.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() != protoreflect.MessageKind && fd.Kind() != protoreflect.GroupKind {
			return true
		}
		p := path + "." + string(fd.Name())
		switch {
		case fd.IsList():
			for i := 0; i < v.List().Len(); i++ {
				errs = append(errs, validateDeep(v.List().Get(i).Message().Interface(), fmt.Sprintf("%s[%d]", p, i)))
			}
		case fd.IsMap():
			if fd.MapValue().Kind() == protoreflect.MessageKind {
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					errs = append(errs, validateDeep(mv.Message().Interface(), p+"["+k.String()+"]"))
					return true
				})
			}
		default:
			errs = append(errs, validateDeep(v.Message().Interface(), p))
		}
		return true
	})
	return errors.Join(errs...)
}

// kernelSocket is the kernel's socket in deploy/envoy/envoy-uds.yaml.
const kernelSocket = "/var/run/policy-engine/ext-proc/kernel/kernel.sock"

// TestEnvoyBootstrap decodes every deploy/envoy/*.yaml into go-control-plane's Bootstrap with
// every typed config resolved and validated, and checks that it is the setup the kernel
// expects: route names of config/kernel-config.yaml, the ext_proc filter with the route
// attribute, mode override, message timeout and fail-closed, and an HTTP/2 cluster to the
// kernel health-checked over gRPC: on 127.0.0.1:9001 (envoy.yaml), or on the kernel's Unix
// socket (envoy-uds.yaml, a pipe address).
func TestEnvoyBootstrap(t *testing.T) {
	files, err := filepath.Glob(repoRoot + "deploy/envoy/*.yaml")
	if err != nil || len(files) < 2 {
		t.Fatalf("bootstraps: %q, %v", files, err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) { checkBootstrap(t, f, strings.Contains(filepath.Base(f), "uds")) })
	}
}

func checkBootstrap(t *testing.T, path string, uds bool) {
	bs, err := loadBootstrap(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := validateDeep(bs, "bootstrap"); err != nil {
		t.Fatal(err)
	}

	ls := bs.GetStaticResources().GetListeners()
	if len(ls) != 1 || len(ls[0].GetFilterChains()) != 1 {
		t.Fatalf("want one listener with one filter chain, got %d", len(ls))
	}
	var hcm hcmv3.HttpConnectionManager
	if err := ls[0].GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
		t.Fatal(err)
	}
	// One spelling of a path and of a header name for Envoy's routes, the kernel's path
	// fallback and the upstream.
	if !hcm.GetNormalizePath().GetValue() || !hcm.GetMergeSlashes() {
		t.Errorf("normalize_path %v, merge_slashes %v: both must be on", hcm.GetNormalizePath().GetValue(), hcm.GetMergeSlashes())
	}
	if a := hcm.GetPathWithEscapedSlashesAction(); a != hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT && a != hcmv3.HttpConnectionManager_REJECT_REQUEST {
		t.Errorf("path_with_escaped_slashes_action %v: %%2F and %%5C must be unescaped or refused", a)
	}
	if a := hcm.GetCommonHttpProtocolOptions().GetHeadersWithUnderscoresAction(); a != corev3.HttpProtocolOptions_REJECT_REQUEST {
		t.Errorf("headers_with_underscores_action %v: a request with X_User_ID must be refused", a)
	}
	var envoyRoutes []string
	for _, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
		for _, r := range vh.GetRoutes() {
			envoyRoutes = append(envoyRoutes, r.GetName())
		}
	}
	cfg, _, err := kernel.LoadConfig(repoRoot + "config/kernel-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, rp := range cfg.PolicyKernel.RoutePolicies {
		if !slices.Contains(envoyRoutes, rp.RouteName) {
			t.Errorf("kernel route %q has no Envoy route of that name (Envoy routes: %q)", rp.RouteName, envoyRoutes)
		}
	}

	filters := hcm.GetHttpFilters()
	if len(filters) != 2 || filters[0].GetName() != "envoy.filters.http.ext_proc" || filters[1].GetName() != "envoy.filters.http.router" {
		t.Fatalf("http filters: %v", filters)
	}
	var ep extprocv3.ExternalProcessor
	if err := filters[0].GetTypedConfig().UnmarshalTo(&ep); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(ep.GetRequestAttributes(), "xds.route_name") {
		t.Errorf("request_attributes %q lack xds.route_name", ep.GetRequestAttributes())
	}
	if !ep.GetAllowModeOverride() {
		t.Error("allow_mode_override is off: the kernel cannot ask for bodies or skip the response phase")
	}
	if ep.GetFailureModeAllow() {
		t.Error("failure_mode_allow is on: a broken policy engine would let every request through")
	}
	if d := ep.GetMessageTimeout().AsDuration(); d != time.Duration(cfg.PolicyKernel.Server.MessageTimeoutMS)*time.Millisecond {
		t.Errorf("message_timeout %v, but the kernel config's message_timeout_ms is %d", d, cfg.PolicyKernel.Server.MessageTimeoutMS)
	}
	cluster := ep.GetGrpcService().GetEnvoyGrpc().GetClusterName()

	var kc *clusterv3.Cluster
	for _, c := range bs.GetStaticResources().GetClusters() {
		if c.GetName() == cluster {
			kc = c
		}
	}
	if kc == nil {
		t.Fatalf("no cluster %q for the ext_proc filter", cluster)
	}
	var po upstreamhttpv3.HttpProtocolOptions
	if err := kc.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].UnmarshalTo(&po); err != nil {
		t.Fatal(err)
	}
	if po.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil {
		t.Error("the kernel's cluster does not speak HTTP/2")
	}
	addr := kc.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress()
	if uds {
		if p := addr.GetPipe().GetPath(); p != kernelSocket {
			t.Errorf("kernel endpoint %v, want the pipe %s", addr, kernelSocket)
		}
		// The socket the file names is one a kernel config accepts, with the mode the file's
		// comment gives.
		kc := strings.Replace(kernelYAML, "    message_timeout_ms: 2000\n", "    message_timeout_ms: 2000\n    socket_path: "+kernelSocket+"\n    socket_mode: \"0660\"\n", 1)
		if _, err := kernel.ParseConfig("uds.yaml", []byte(fmt.Sprintf(kc, "u"))); err != nil {
			t.Error(err)
		}
	} else if sa := addr.GetSocketAddress(); sa.GetAddress() != "127.0.0.1" || sa.GetPortValue() != uint32(cfg.PolicyKernel.Server.Port) {
		t.Errorf("kernel endpoint %s:%d, want 127.0.0.1:%d", sa.GetAddress(), sa.GetPortValue(), cfg.PolicyKernel.Server.Port)
	}
	hc := kc.GetHealthChecks()
	if len(hc) != 1 || hc[0].GetGrpcHealthCheck() == nil || hc[0].GetTimeout().AsDuration() != 100*time.Millisecond {
		t.Errorf("the kernel's cluster is not health-checked over gRPC with a 100 ms timeout: %v", hc)
	}
	if !uds {
		checkDocsQuoteBootstrap(t, bs, cluster, ep.GetRequestAttributes())
	}
}

// checkDocsQuoteBootstrap: the README's Envoy example and docs/operations.md quote the bootstrap
// as it is: the ext_proc cluster's name, the request attributes, and the upstream's address,
// which the README says how to provide.
func checkDocsQuoteBootstrap(t *testing.T, bs *bootstrapv3.Bootstrap, cluster string, attrs []string) {
	t.Helper()
	readme, err := os.ReadFile(repoRoot + "README.md")
	if err != nil {
		t.Fatal(err)
	}
	ops, err := os.ReadFile(repoRoot + "docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	quoted := `request_attributes: ["` + strings.Join(attrs, `", "`) + `"]`
	for _, want := range []string{"cluster_name: " + cluster + " }", "  - name: " + cluster + "\n", "cluster_name: " + cluster + "\n", quoted} {
		if !strings.Contains(string(readme), want) {
			t.Errorf("README.md does not quote the bootstrap's %q", want)
		}
	}
	if !strings.Contains(string(ops), quoted) {
		t.Errorf("docs/operations.md does not quote the bootstrap's %s", quoted)
	}
	for _, c := range bs.GetStaticResources().GetClusters() {
		if c.GetName() == cluster {
			continue
		}
		sa := c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
		if up := fmt.Sprintf("%s:%d", sa.GetAddress(), sa.GetPortValue()); !strings.Contains(string(readme), "upstream is "+up) {
			t.Errorf("README.md does not say that the upstream is %s", up)
		}
	}
}

// TestEnvoyBootstrapCatchesMistakes shows that the decoding above fails on the mistakes it is
// there to catch.
func TestEnvoyBootstrapCatchesMistakes(t *testing.T) {
	good, err := os.ReadFile(repoRoot + "deploy/envoy/envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f := func(name, from, to, wantErr string) {
		t.Helper()
		if !strings.Contains(string(good), from) {
			t.Fatalf("%s: envoy.yaml no longer contains %q", name, from)
		}
		p := t.TempDir() + "/envoy.yaml"
		if err := os.WriteFile(p, []byte(strings.Replace(string(good), from, to, 1)), 0o600); err != nil {
			t.Fatal(err)
		}
		bs, err := loadBootstrap(p)
		if err == nil {
			err = validateDeep(bs, "bootstrap")
		}
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s: error %v, want one containing %q", name, err, wantErr)
		}
	}
	f("misspelt field", "allow_mode_override: true", "allow_mode_overide: true", "allow_mode_overide")
	f("misspelt type", "ext_proc.v3.ExternalProcessor", "ext_proc.v3.ExternalProcesor", "ExternalProcesor")
	f("wrong type of value", "message_timeout: 0.2s", "message_timeout: soon", `invalid google.protobuf.Duration value "soon"`)
	f("invalid value", "port_value: 9001", "port_value: 99999", "PortValue")
	f("misspelt enum value", "headers_with_underscores_action: REJECT_REQUEST", "headers_with_underscores_action: REJECT", "REJECT")
}

// TestComposeQuickStart decodes deploy/compose/compose.yaml (the parts it uses, strictly) and
// holds it to the bootstrap TestEnvoyBootstrap checks: Envoy v1.36 runs that very file, in the
// engine's network namespace, so that the bootstrap's 127.0.0.1 endpoints are the kernel's
// ext_proc port and the echo upstream's port; the engine runs as the image's user with a
// read-only root and tmpfs where the processes write, and is restarted when supervisord ends.
func TestComposeQuickStart(t *testing.T) {
	type service struct {
		Build           map[string]any    `yaml:"build"`
		Image           string            `yaml:"image"`
		User            string            `yaml:"user"`
		ReadOnly        bool              `yaml:"read_only"`
		CapDrop         []string          `yaml:"cap_drop"`
		SecurityOpt     []string          `yaml:"security_opt"`
		Tmpfs           []string          `yaml:"tmpfs"`
		Environment     map[string]string `yaml:"environment"`
		Secrets         []map[string]any  `yaml:"secrets"`
		Ports           []string          `yaml:"ports"`
		Restart         string            `yaml:"restart"`
		StopGracePeriod string            `yaml:"stop_grace_period"`
		NetworkMode     string            `yaml:"network_mode"`
		DependsOn       []string          `yaml:"depends_on"`
		Volumes         []string          `yaml:"volumes"`
		Command         []string          `yaml:"command"`
	}
	var compose struct {
		Name     string                    `yaml:"name"`
		Services map[string]service        `yaml:"services"`
		Secrets  map[string]map[string]any `yaml:"secrets"`
	}
	f, err := os.Open(repoRoot + "deploy/compose/compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(&compose); err != nil {
		t.Fatalf("deploy/compose/compose.yaml: %v", err)
	}
	engine, envoy, upstream := compose.Services["policy-engine"], compose.Services["envoy"], compose.Services["upstream"]

	if !strings.HasPrefix(envoy.Image, "envoyproxy/envoy:v1.36.") {
		t.Errorf("envoy image %q: want envoyproxy/envoy:v1.36.x", envoy.Image)
	}
	var bootstrap string
	for _, v := range envoy.Volumes {
		src, rest, _ := strings.Cut(v, ":")
		if dst, _, _ := strings.Cut(rest, ":"); dst == "/etc/envoy/envoy.yaml" {
			bootstrap = src
		}
	}
	if bootstrap != "../envoy/envoy.yaml" {
		t.Fatalf("envoy's /etc/envoy/envoy.yaml is %q, want ../envoy/envoy.yaml (the bootstrap the tests decode)", bootstrap)
	}
	bs, err := loadBootstrap(repoRoot + "deploy/compose/" + bootstrap)
	if err != nil {
		t.Fatal(err)
	}
	if err := validateDeep(bs, "bootstrap"); err != nil {
		t.Fatal(err)
	}
	ports := map[string]uint32{}
	for _, c := range bs.GetStaticResources().GetClusters() {
		sa := c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
		if sa.GetAddress() != "127.0.0.1" {
			t.Errorf("cluster %s at %s: in compose only the shared loopback reaches the other services", c.GetName(), sa.GetAddress())
		}
		ports[c.GetName()] = sa.GetPortValue()
	}
	listener := bs.GetStaticResources().GetListeners()[0].GetAddress().GetSocketAddress().GetPortValue()

	for name, s := range map[string]service{"envoy": envoy, "upstream": upstream} {
		if s.NetworkMode != "service:policy-engine" || !slices.Contains(s.DependsOn, "policy-engine") {
			t.Errorf("%s: network_mode %q, depends_on %q: it must share policy-engine's network namespace", name, s.NetworkMode, s.DependsOn)
		}
	}
	if want := fmt.Sprintf("-listen=:%d", ports["backend"]); !slices.Contains(upstream.Command, want) {
		t.Errorf("upstream command %q lacks %s (the bootstrap's backend port)", upstream.Command, want)
	}
	cfg, _, err := kernel.LoadConfig(repoRoot + "config/kernel-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if ports["policy_kernel"] != uint32(cfg.PolicyKernel.Server.Port) {
		t.Errorf("the bootstrap sends ext_proc to port %d, the image's kernel listens on %d", ports["policy_kernel"], cfg.PolicyKernel.Server.Port)
	}
	if want := fmt.Sprintf("%d:%d", listener, listener); !slices.ContainsFunc(engine.Ports, func(p string) bool { return strings.HasPrefix(p, want) }) {
		t.Errorf("policy-engine ports %q do not publish Envoy's listener %d", engine.Ports, listener)
	}
	if engine.User != "1000:1000" || !engine.ReadOnly || !slices.Equal(engine.CapDrop, []string{"ALL"}) || engine.Restart == "" || engine.Restart == "no" {
		t.Errorf("policy-engine: user %q, read_only %v, cap_drop %q, restart %q", engine.User, engine.ReadOnly, engine.CapDrop, engine.Restart)
	}
	for _, dir := range []string{"/var/run/policy-engine", "/var/log/policy-engine", "/tmp"} {
		if !slices.ContainsFunc(engine.Tmpfs, func(s string) bool { return s == dir || strings.HasPrefix(s, dir+":") }) {
			t.Errorf("policy-engine has no tmpfs at %s, where its processes write", dir)
		}
	}
	if _, ok := engine.Environment["POLICY_ENGINE_API_KEY_SHA256"]; !ok {
		t.Error("policy-engine lacks POLICY_ENGINE_API_KEY_SHA256, which the image's agent config needs")
	}
	if len(engine.Secrets) != 1 || engine.Secrets[0]["target"] != "/etc/policy-engine/keys/jwt-public.pem" {
		t.Errorf("policy-engine secrets %v: want the JWT key at /etc/policy-engine/keys/jwt-public.pem", engine.Secrets)
	}
}
