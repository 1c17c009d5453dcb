package helmtest

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"slices"
	"testing"
	"time"

	egv1a1 "github.com/envoyproxy/gateway/api/v1alpha1"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	istioapi "istio.io/api/networking/v1alpha3"
	istionet "istio.io/client-go/pkg/apis/networking/v1alpha3"
	gwapiv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

// documents splits a YAML file into its documents, comments-only ones left out.
func documents(t *testing.T, file string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var docs [][]byte
	for _, d := range bytes.Split(b, []byte("\n---")) {
		if len(bytes.TrimSpace(stripComments(d))) > 0 {
			docs = append(docs, d)
		}
	}
	return docs
}

func kindOf(t *testing.T, doc []byte) string {
	t.Helper()
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &head); err != nil {
		t.Fatal(err)
	}
	return head.APIVersion + " " + head.Kind
}

// protoStrict decodes the YAML of one proto message with protojson, unknown fields refused.
func protoStrict(v any, m proto.Message) error {
	j, err := yaml.Marshal(v)
	if err != nil {
		return err
	}
	if j, err = yaml.YAMLToJSON(j); err != nil {
		return err
	}
	return protojson.UnmarshalOptions{DiscardUnknown: false}.Unmarshal(j, m)
}

// checkExtProc holds an ext_proc filter config to what the kernel needs, as the repository's
// Envoy bootstrap does (e2e/ops TestEnvoyBootstrap): the route name and client address as
// attributes, mode override, fail closed, Envoy's message timeout the kernel's.
func checkExtProc(t *testing.T, ep *extprocv3.ExternalProcessor, messageTimeoutMS int) {
	t.Helper()
	if err := ep.ValidateAll(); err != nil {
		t.Error(err)
	}
	for _, a := range []string{"xds.route_name", "source.address"} {
		if !slices.Contains(ep.GetRequestAttributes(), a) {
			t.Errorf("request_attributes %q lack %s", ep.GetRequestAttributes(), a)
		}
	}
	if !ep.GetAllowModeOverride() || ep.GetFailureModeAllow() {
		t.Errorf("allow_mode_override %v, failure_mode_allow %v: want true, false", ep.GetAllowModeOverride(), ep.GetFailureModeAllow())
	}
	if d := ep.GetMessageTimeout().AsDuration(); d != time.Duration(messageTimeoutMS)*time.Millisecond {
		t.Errorf("message_timeout %v, the kernel's message_timeout_ms %d", d, messageTimeoutMS)
	}
}

func messageTimeoutMS(t *testing.T, r *rendered) int {
	t.Helper()
	var k struct {
		PolicyKernel struct {
			Server struct {
				MessageTimeoutMS int `json:"message_timeout_ms"`
			} `json:"server"`
			RoutePolicies []struct {
				RouteName string `json:"route_name"`
			} `json:"route_policies"`
		} `json:"policy_kernel"`
	}
	if err := yaml.Unmarshal([]byte(r.Kernel), &k); err != nil {
		t.Fatal(err)
	}
	return k.PolicyKernel.Server.MessageTimeoutMS
}

func kernelRoutes(t *testing.T, r *rendered) []string {
	t.Helper()
	var k struct {
		PolicyKernel struct {
			RoutePolicies []struct {
				RouteName string `json:"route_name"`
			} `json:"route_policies"`
		} `json:"policy_kernel"`
	}
	if err := yaml.Unmarshal([]byte(r.Kernel), &k); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, rp := range k.PolicyKernel.RoutePolicies {
		names = append(names, rp.RouteName)
	}
	return names
}

func servicePort(t *testing.T, r *rendered, name string) int32 {
	t.Helper()
	for _, p := range r.Service.Spec.Ports {
		if p.Name == name {
			return p.Port
		}
	}
	t.Fatalf("the Service has no port %s", name)
	return 0
}

// TestEnvoyGatewayExample decodes deploy/kubernetes/envoy-gateway.yaml strictly into Envoy
// Gateway's and Gateway API's published types, and holds it to the chart rendered with
// deploy/kubernetes/envoy-gateway-values.yaml: the policy's backend is the chart's Service and
// ext_proc port, it fails closed with the kernel's message timeout, sends the attributes the
// kernel reads and lets it override the processing mode, and every route of the kernel config
// is the name Envoy Gateway gives one of the HTTPRoute's matches.
func TestEnvoyGatewayExample(t *testing.T) {
	vals, err := os.ReadFile(repoRoot + "deploy/kubernetes/envoy-gateway-values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	r := render(t, string(vals))
	var policy *egv1a1.EnvoyExtensionPolicy
	routes := map[string]*gwapiv1.HTTPRoute{}
	for _, doc := range documents(t, repoRoot+"deploy/kubernetes/envoy-gateway.yaml") {
		switch k := kindOf(t, doc); k {
		case "gateway.envoyproxy.io/v1alpha1 EnvoyExtensionPolicy":
			policy = &egv1a1.EnvoyExtensionPolicy{}
			if err := strictYAML(doc, policy); err != nil {
				t.Fatalf("EnvoyExtensionPolicy: %v", err)
			}
		case "gateway.networking.k8s.io/v1 HTTPRoute":
			hr := &gwapiv1.HTTPRoute{}
			if err := strictYAML(doc, hr); err != nil {
				t.Fatalf("HTTPRoute: %v", err)
			}
			routes[hr.Name] = hr
		default:
			t.Fatalf("unexpected %s", k)
		}
	}
	if policy == nil || len(policy.Spec.ExtProc) != 1 {
		t.Fatalf("want one EnvoyExtensionPolicy with one extProc, got %+v", policy)
	}
	ep := policy.Spec.ExtProc[0]
	if len(ep.BackendRefs) != 1 {
		t.Fatalf("backendRefs %+v", ep.BackendRefs)
	}
	ref := ep.BackendRefs[0]
	if string(ref.Name) != r.Service.Name || ref.Port == nil || int32(*ref.Port) != servicePort(t, r, "grpc-ext-proc") || (ref.Kind != nil && *ref.Kind != "Service") {
		t.Errorf("backendRef %s:%v, want the chart's Service %s port grpc-ext-proc", ref.Name, ref.Port, r.Service.Name)
	}
	if ep.FailOpen == nil || *ep.FailOpen {
		t.Error("failOpen must be set, to false: a policy engine that cannot answer must not open the doors")
	}
	mt, err := time.ParseDuration(string(*ep.MessageTimeout))
	if err != nil || mt != time.Duration(messageTimeoutMS(t, r))*time.Millisecond {
		t.Errorf("messageTimeout %v (%v), the kernel's message_timeout_ms %d", mt, err, messageTimeoutMS(t, r))
	}
	pm := ep.ProcessingMode
	if pm == nil || !pm.AllowModeOverride || pm.Request == nil || pm.Response == nil {
		t.Fatalf("processingMode %+v: want allowModeOverride, request and response headers", pm)
	}
	for _, a := range []string{"xds.route_name", "source.address"} {
		if !slices.Contains(pm.Request.Attributes, a) {
			t.Errorf("request attributes %q lack %s", pm.Request.Attributes, a)
		}
	}
	// The CRD's own pattern for attributes (a kubebuilder marker of the Go type, which decoding
	// does not apply).
	for _, a := range pm.Request.Attributes {
		if !regexp.MustCompile(`^(connection\.|source\.|destination\.|request\.|response\.|upstream\.|xds\.route_)[a-z_1-9]*$`).MatchString(a) {
			t.Errorf("attribute %q: Envoy Gateway's CRD refuses it", a)
		}
	}
	// The Envoy route names Envoy Gateway makes of the targeted HTTPRoutes.
	var envoyRoutes []string
	for _, tr := range policy.Spec.TargetRefs {
		hr := routes[string(tr.Name)]
		if tr.Kind != "HTTPRoute" || hr == nil {
			t.Fatalf("targetRef %+v is not an HTTPRoute of the example", tr)
		}
		if hr.Namespace != policy.Namespace {
			t.Errorf("the HTTPRoute is in %q, the policy in %q", hr.Namespace, policy.Namespace)
		}
		host := "*"
		if len(hr.Spec.Hostnames) > 0 {
			t.Fatal("the example's route names assume an HTTPRoute without hostnames")
		}
		for i, rule := range hr.Spec.Rules {
			for j := range rule.Matches {
				envoyRoutes = append(envoyRoutes, fmt.Sprintf("httproute/%s/%s/rule/%d/match/%d/%s", hr.Namespace, hr.Name, i, j, host))
			}
		}
	}
	for _, name := range kernelRoutes(t, r) {
		if !slices.Contains(envoyRoutes, name) {
			t.Errorf("kernel route %q is no Envoy Gateway route name of the example (%q)", name, envoyRoutes)
		}
	}
}

// TestIstioExample decodes deploy/kubernetes/istio.yaml strictly: the objects into Istio's
// client-go types, their specs with protojson into istio.io/api's messages (client-go's own
// JSON decoding of a spec lets unknown fields through), and the patch that inserts the filter
// into go-control-plane's HttpFilter with its ExternalProcessor, then holds the filter to the
// chart's Service and kernel config and the VirtualService's route names to the kernel's.
func TestIstioExample(t *testing.T) {
	r := render(t, "")
	var filters []*istionet.EnvoyFilter
	var services []*istionet.VirtualService
	for _, doc := range documents(t, repoRoot+"deploy/kubernetes/istio.yaml") {
		var raw struct {
			Spec map[string]any `json:"spec"`
		}
		if err := yaml.Unmarshal(doc, &raw); err != nil {
			t.Fatal(err)
		}
		switch k := kindOf(t, doc); k {
		case "networking.istio.io/v1alpha3 EnvoyFilter":
			ef := &istionet.EnvoyFilter{}
			if err := strictYAML(doc, ef); err != nil {
				t.Fatalf("EnvoyFilter: %v", err)
			}
			if err := protoStrict(raw.Spec, &ef.Spec); err != nil {
				t.Fatalf("EnvoyFilter spec: %v", err)
			}
			filters = append(filters, ef)
		case "networking.istio.io/v1alpha3 VirtualService":
			vs := &istionet.VirtualService{}
			if err := strictYAML(doc, vs); err != nil {
				t.Fatalf("VirtualService: %v", err)
			}
			if err := protoStrict(raw.Spec, &vs.Spec); err != nil {
				t.Fatalf("VirtualService spec: %v", err)
			}
			services = append(services, vs)
		default:
			t.Fatalf("unexpected %s", k)
		}
	}
	if len(filters) != 1 || len(filters[0].Spec.ConfigPatches) != 1 {
		t.Fatalf("want one EnvoyFilter with one patch")
	}
	p := filters[0].Spec.ConfigPatches[0]
	lm := p.GetMatch().GetListener().GetFilterChain().GetFilter()
	if p.GetApplyTo() != istioapi.EnvoyFilter_HTTP_FILTER || p.GetPatch().GetOperation() != istioapi.EnvoyFilter_Patch_INSERT_BEFORE ||
		lm.GetName() != "envoy.filters.network.http_connection_manager" || lm.GetSubFilter().GetName() != "envoy.filters.http.router" {
		t.Errorf("the patch does not insert an HTTP filter before the router: %v", p)
	}
	var hf hcmv3.HttpFilter
	j, err := protojson.Marshal(p.GetPatch().GetValue())
	if err != nil {
		t.Fatal(err)
	}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(j, &hf); err != nil {
		t.Fatalf("the patch's value as an Envoy HttpFilter: %v", err)
	}
	var ep extprocv3.ExternalProcessor
	if hf.GetName() != "envoy.filters.http.ext_proc" || hf.GetTypedConfig().UnmarshalTo(&ep) != nil {
		t.Fatalf("the patch inserts %q (%s), not the ext_proc filter", hf.GetName(), hf.GetTypedConfig().GetTypeUrl())
	}
	checkExtProc(t, &ep, messageTimeoutMS(t, r))
	want := fmt.Sprintf("outbound|%d||%s.policy-engine.svc.cluster.local", servicePort(t, r, "grpc-ext-proc"), r.Service.Name)
	if c := ep.GetGrpcService().GetEnvoyGrpc().GetClusterName(); c != want {
		t.Errorf("ext_proc cluster %q, want Istio's cluster of the chart's Service %q", c, want)
	}
	var names []string
	for _, vs := range services {
		for _, h := range vs.Spec.GetHttp() {
			names = append(names, h.GetName())
		}
	}
	for _, name := range kernelRoutes(t, r) {
		if !slices.Contains(names, name) {
			t.Errorf("kernel route %q is no VirtualService route name of the example (%q)", name, names)
		}
	}
}

// TestExamplesRefuseMistakes shows that the decoding above refuses what Envoy Gateway, Istio
// or Envoy would: a misspelt field of the policy, of the EnvoyFilter's spec, and of the
// ext_proc filter inside its patch.
func TestExamplesRefuseMistakes(t *testing.T) {
	eg := documents(t, repoRoot+"deploy/kubernetes/envoy-gateway.yaml")[0]
	bad := bytes.Replace(eg, []byte("failOpen:"), []byte("failopen:"), 1)
	if err := strictYAML(bad, &egv1a1.EnvoyExtensionPolicy{}); err == nil {
		t.Error("EnvoyExtensionPolicy with failopen accepted")
	}
	istio := documents(t, repoRoot+"deploy/kubernetes/istio.yaml")[0]
	for _, c := range []struct{ from, to string }{
		{"configPatches:", "configPatch:"},
		{"allow_mode_override:", "allow_mode_overide:"},
	} {
		doc := bytes.Replace(istio, []byte(c.from), []byte(c.to), 1)
		var raw struct {
			Spec map[string]any `json:"spec"`
		}
		if err := yaml.Unmarshal(doc, &raw); err != nil {
			t.Fatal(err)
		}
		var spec istioapi.EnvoyFilter
		err := protoStrict(raw.Spec, &spec)
		if err == nil {
			var hf hcmv3.HttpFilter
			j, _ := protojson.Marshal(spec.GetConfigPatches()[0].GetPatch().GetValue())
			err = protojson.Unmarshal(j, &hf)
		}
		if err == nil {
			t.Errorf("EnvoyFilter with %s accepted", c.to)
		}
	}
}
