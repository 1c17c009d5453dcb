package helmtest

import (
	"maps"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// kernelConfig and agentConfig are the parts of the two configs the chart must agree with
// (the binaries themselves check the whole files: TestChartConfigsRunWithTheBinaries).
type kernelConfig struct {
	PolicyKernel struct {
		Server struct {
			Address           string `json:"address"`
			Port              int32  `json:"port"`
			DrainDelayMS      int    `json:"drain_delay_ms"`
			ShutdownTimeoutMS int    `json:"shutdown_timeout_ms"`
		} `json:"server"`
		Agents []struct {
			Name       string `json:"name"`
			SocketPath string `json:"socket_path"`
		} `json:"agents"`
		Observability struct {
			MetricsAddress string `json:"metrics_address"`
			MetricsPort    int32  `json:"metrics_port"`
			AdminAddress   string `json:"admin_address"`
			AdminPort      int32  `json:"admin_port"`
		} `json:"observability"`
	} `json:"policy_kernel"`
}

type agentConfig struct {
	AgentCore struct {
		Name          string `json:"name"`
		SocketPath    string `json:"socket_path"`
		Observability struct {
			MetricsAddress string `json:"metrics_address"`
			AdminAddress   string `json:"admin_address"`
		} `json:"observability"`
	} `json:"agent_core"`
}

func (r *rendered) configs(t *testing.T) (kernelConfig, agentConfig) {
	t.Helper()
	var k kernelConfig
	var a agentConfig
	if err := yaml.Unmarshal([]byte(r.Kernel), &k); err != nil {
		t.Fatalf("kernel-config.yaml: %v", err)
	}
	if err := yaml.Unmarshal([]byte(r.Agent), &a); err != nil {
		t.Fatalf("agent-config.yaml: %v", err)
	}
	return k, a
}

// supervisord is the repository's supervisord.conf, which the image runs: section → key → value.
func supervisord(t *testing.T) map[string]map[string]string {
	t.Helper()
	b, err := os.ReadFile(repoRoot + "supervisord.conf")
	if err != nil {
		t.Fatal(err)
	}
	conf := map[string]map[string]string{}
	var section string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, " ") || strings.HasPrefix(l, "\t") {
			continue // a continuation line of the value above (the fatal-exit listener's script)
		}
		l = strings.TrimSpace(l)
		switch {
		case l == "" || strings.HasPrefix(l, ";") || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "["):
			section = strings.Trim(l, "[]")
			conf[section] = map[string]string{}
		default:
			k, v, _ := strings.Cut(l, "=")
			conf[section][strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return conf
}

// configFlag returns the --config= file of a supervisord program.
func configFlag(t *testing.T, sv map[string]map[string]string, program string) string {
	t.Helper()
	m := regexp.MustCompile(`--config=(\S+)`).FindStringSubmatch(sv["program:"+program]["command"])
	if m == nil {
		t.Fatalf("supervisord.conf: program %s has no --config=", program)
	}
	return m[1]
}

// imageUser returns the uid and gid the Dockerfile gives the user the image runs as.
func imageUser(t *testing.T) (uid, gid int64) {
	t.Helper()
	b, err := os.ReadFile(repoRoot + "Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	u := regexp.MustCompile(`useradd [^\n]*--uid (\d+)`).FindSubmatch(b)
	g := regexp.MustCompile(`groupadd [^\n]*--gid (\d+)`).FindSubmatch(b)
	if u == nil || g == nil {
		t.Fatal("the Dockerfile no longer creates its user with useradd --uid and groupadd --gid")
	}
	uid, _ = strconv.ParseInt(string(u[1]), 10, 64)
	gid, _ = strconv.ParseInt(string(g[1]), 10, 64)
	return uid, gid
}

func hostPort(t *testing.T, addr string) (string, int32) {
	t.Helper()
	i := strings.LastIndex(addr, ":")
	p, err := strconv.Atoi(addr[i+1:])
	if i < 0 || err != nil {
		t.Fatalf("address %q is not host:port", addr)
	}
	return addr[:i], int32(p)
}

// TestChartDefaults renders the chart with its default values and holds the objects to the
// image and the binaries: the image's user, the files supervisord.conf starts the binaries
// with, the ports and addresses of the configs, the probe paths, where the processes write.
func TestChartDefaults(t *testing.T) {
	r := render(t, "")
	if r.Deployment == nil || r.ConfigMap == nil || r.Service == nil || r.ServiceAccount == nil || r.PDB == nil {
		t.Fatalf("missing objects: %+v", r)
	}
	if r.HPA != nil || r.ServiceMonitor != nil {
		t.Error("the HorizontalPodAutoscaler and the ServiceMonitor are off by default")
	}
	d, pod, c := r.Deployment, &r.Deployment.Spec.Template.Spec, r.container(t)
	kc, ac := r.configs(t)
	sv := supervisord(t)

	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("replicas %v, want 2", d.Spec.Replicas)
	}
	// Selectors: the Deployment's, the Service's and the PDB's pick the pods.
	labels := d.Spec.Template.Labels
	for what, sel := range map[string]map[string]string{"deployment": d.Spec.Selector.MatchLabels, "service": r.Service.Spec.Selector, "pdb": r.PDB.Spec.Selector.MatchLabels} {
		if len(sel) == 0 {
			t.Errorf("%s selector is empty", what)
		}
		for k, v := range sel {
			if labels[k] != v {
				t.Errorf("%s selector %s=%s does not match the pod labels %v", what, k, v, labels)
			}
		}
	}
	if r.PDB.Spec.MaxUnavailable == nil || r.PDB.Spec.MaxUnavailable.IntValue() != 1 {
		t.Errorf("PDB maxUnavailable %v, want 1", r.PDB.Spec.MaxUnavailable)
	}

	// Security: the image's user, no privilege, read-only root, the runtime's seccomp profile.
	uid, gid := imageUser(t)
	psc := pod.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser != uid ||
		psc.RunAsGroup == nil || *psc.RunAsGroup != gid || psc.FSGroup == nil || *psc.FSGroup != gid ||
		psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod securityContext %+v: want non-root uid %d gid %d, fsGroup %d, seccomp RuntimeDefault", psc, uid, gid, gid)
	}
	csc := c.SecurityContext
	if csc == nil || csc.ReadOnlyRootFilesystem == nil || !*csc.ReadOnlyRootFilesystem ||
		csc.AllowPrivilegeEscalation == nil || *csc.AllowPrivilegeEscalation || csc.Privileged == nil || *csc.Privileged ||
		csc.Capabilities == nil || !slices.Equal(csc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(csc.Capabilities.Add) > 0 {
		t.Errorf("container securityContext %+v: want a read-only root, no privilege escalation, every capability dropped", csc)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("the pod mounts a service account token it has no use for")
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("resources %+v: want CPU and memory requests and a memory limit", c.Resources)
	}
	if c.Command != nil || c.Args != nil {
		t.Errorf("command %q args %q: the image's CMD (supervisord) must run", c.Command, c.Args)
	}
	if _, ok := d.Spec.Template.Annotations["checksum/config"]; ok {
		t.Error("pods roll on every ConfigMap change although the binaries reload their configs themselves")
	}

	// Ports: named, and the ones the configs listen on.
	for _, p := range c.Ports {
		if errs := validation.IsValidPortName(p.Name); len(errs) > 0 {
			t.Errorf("port name %q: %v", p.Name, errs)
		}
	}
	srv, obs := kc.PolicyKernel.Server, kc.PolicyKernel.Observability
	if srv.Address != "0.0.0.0" || srv.Port != port(t, c, "grpc-ext-proc") {
		t.Errorf("kernel ext_proc on %s:%d, port grpc-ext-proc is %d: want 0.0.0.0 (Envoy comes over the pod network)", srv.Address, srv.Port, port(t, c, "grpc-ext-proc"))
	}
	if obs.MetricsAddress != "0.0.0.0" || obs.MetricsPort != port(t, c, "http-metrics") {
		t.Errorf("kernel metrics on %s:%d, port http-metrics is %d", obs.MetricsAddress, obs.MetricsPort, port(t, c, "http-metrics"))
	}
	if h, p := hostPort(t, ac.AgentCore.Observability.MetricsAddress); h != "0.0.0.0" || p != port(t, c, "agent-metrics") {
		t.Errorf("agent metrics on %s, port agent-metrics is %d", ac.AgentCore.Observability.MetricsAddress, port(t, c, "agent-metrics"))
	}
	// The admin listeners (config, explain, pprof) on the pod's loopback, in no Service and no
	// containerPort: kubectl port-forward reaches them, the pod network does not.
	if obs.AdminAddress != "127.0.0.1" || obs.AdminPort != 9190 {
		t.Errorf("kernel admin on %s:%d, want 127.0.0.1:9190", obs.AdminAddress, obs.AdminPort)
	}
	if h, p := hostPort(t, ac.AgentCore.Observability.AdminAddress); h != "127.0.0.1" || p != 9191 {
		t.Errorf("agent admin on %s, want 127.0.0.1:9191", ac.AgentCore.Observability.AdminAddress)
	}
	for _, cp := range c.Ports {
		if cp.ContainerPort == obs.AdminPort || cp.ContainerPort == 9191 {
			t.Errorf("container port %s exposes an admin listener", cp.Name)
		}
	}
	for _, sp := range r.Service.Spec.Ports {
		if sp.Port == obs.AdminPort || sp.Port == 9191 {
			t.Errorf("service port %s is an admin listener's", sp.Name)
		}
	}
	for _, sp := range r.Service.Spec.Ports {
		if sp.TargetPort.StrVal == "" {
			t.Errorf("service port %s targets a number, not a container port name", sp.Name)
			continue
		}
		port(t, c, sp.TargetPort.StrVal)
		if sp.Name != sp.TargetPort.StrVal {
			t.Errorf("service port %s targets %s", sp.Name, sp.TargetPort.StrVal)
		}
	}

	// Probes: the kernel's health endpoints on its metrics port (TestChartConfigsRunWithTheBinaries
	// asks the running kernel for these paths).
	for what, want := range map[*corev1.Probe]string{c.StartupProbe: "/health/live", c.LivenessProbe: "/health/live", c.ReadinessProbe: "/health/ready"} {
		if what == nil || what.HTTPGet == nil || what.HTTPGet.Path != want || what.HTTPGet.Port.StrVal != "http-metrics" {
			t.Errorf("probe %+v: want GET %s on port http-metrics", what, want)
		}
	}

	// Files: no subPath anywhere (it would never be updated); the configs where supervisord.conf
	// starts the binaries with them, from the ConfigMap mounted as a directory.
	for _, m := range c.VolumeMounts {
		if m.SubPath != "" || m.SubPathExpr != "" {
			t.Errorf("volume %s is mounted with a subPath: its files would never be updated", m.Name)
		}
	}
	for _, program := range []string{"policy-kernel", "policy-agent"} {
		file := configFlag(t, sv, program)
		m, ok := mountUnder(c, file)
		if !ok {
			t.Fatalf("nothing is mounted where supervisord.conf has %s's config (%s)", program, file)
		}
		v, _ := r.volumeAt(t, m.MountPath)
		rel := strings.TrimPrefix(file, m.MountPath+"/")
		found := false
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ConfigMap != nil && s.ConfigMap.Name == r.ConfigMap.Name {
					for _, it := range s.ConfigMap.Items {
						found = found || (it.Path == rel && r.ConfigMap.Data[it.Key] != "")
					}
				}
			}
		}
		if !found || !m.ReadOnly {
			t.Errorf("%s: %s is not the ConfigMap's file %s in a read-only directory mount", program, file, rel)
		}
	}
	// Where the processes write: emptyDirs, for every file supervisord.conf names (its sockets,
	// pid file, logs) and the agent's socket.
	writes := []string{ac.AgentCore.SocketPath, "/tmp/x"}
	for _, sec := range sv {
		for _, k := range []string{"logfile", "pidfile", "file", "stdout_logfile", "stderr_logfile"} {
			// NONE: supervisord writes no file (an event listener's stdout is its protocol).
			if v := sec[k]; v != "" && v != "NONE" && !strings.HasPrefix(v, "/dev/") {
				writes = append(writes, v)
			}
		}
		if v := sec["childlogdir"]; v != "" {
			writes = append(writes, v+"/x")
		}
	}
	for _, f := range writes {
		m, ok := mountUnder(c, f)
		if !ok {
			t.Errorf("%s is on the read-only root filesystem", f)
			continue
		}
		if v, _ := r.volumeAt(t, m.MountPath); v.EmptyDir == nil || m.ReadOnly || v.EmptyDir.SizeLimit == nil {
			t.Errorf("%s is in volume %s, not a writable emptyDir with a size limit", f, m.Name)
		}
	}
	if len(kc.PolicyKernel.Agents) != 1 || kc.PolicyKernel.Agents[0].SocketPath != ac.AgentCore.SocketPath || kc.PolicyKernel.Agents[0].Name != ac.AgentCore.Name {
		t.Errorf("the kernel's agents %+v are not the agent %q at %q", kc.PolicyKernel.Agents, ac.AgentCore.Name, ac.AgentCore.SocketPath)
	}

	// Secrets: every ${env:NAME} of the configs is a variable of the container, every ${file:/p}
	// a file projected from a Secret; none is written in the configs.
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	for _, cfg := range []string{r.Kernel, r.Agent} {
		for _, m := range regexp.MustCompile(`\$\{env:([^}]+)\}`).FindAllStringSubmatch(cfg, -1) {
			if e, ok := env[m[1]]; !ok || e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
				t.Errorf("${env:%s}: the container has no such variable from a Secret", m[1])
			}
		}
		for _, m := range regexp.MustCompile(`\$\{file:([^}]+)\}`).FindAllStringSubmatch(cfg, -1) {
			if projectedSecret(t, r, m[1]) == "" {
				t.Errorf("${file:%s}: no Secret is projected there", m[1])
			}
		}
	}

	// Stopping: the grace period covers supervisord's stop of the kernel, which covers the
	// kernel's drain.
	stopwait, _ := strconv.Atoi(sv["program:policy-kernel"]["stopwaitsecs"])
	if drain := srv.DrainDelayMS + srv.ShutdownTimeoutMS; drain <= 0 || drain >= stopwait*1000 {
		t.Errorf("drain_delay_ms + shutdown_timeout_ms = %d ms, supervisord's stopwaitsecs %d s", drain, stopwait)
	}
	if g := pod.TerminationGracePeriodSeconds; g == nil || *g <= int64(stopwait) {
		t.Errorf("terminationGracePeriodSeconds %v must exceed supervisord's stopwaitsecs (%d)", g, stopwait)
	}
}

// projectedSecret returns the Secret projected at file, or "".
func projectedSecret(t *testing.T, r *rendered, file string) string {
	t.Helper()
	m, ok := mountUnder(r.container(t), file)
	if !ok {
		return ""
	}
	v, _ := r.volumeAt(t, m.MountPath)
	if v.Projected == nil {
		return ""
	}
	for _, s := range v.Projected.Sources {
		if s.Secret == nil {
			continue
		}
		for _, it := range s.Secret.Items {
			if m.MountPath+"/"+it.Path == file {
				return s.Secret.Name
			}
		}
	}
	return ""
}

// TestChartVariants renders the chart with the optional objects on and with the kernel for an
// Envoy in the same pod.
func TestChartVariants(t *testing.T) {
	t.Run("autoscaling", func(t *testing.T) {
		r := render(t, "autoscaling: {enabled: true, minReplicas: 3, maxReplicas: 7}")
		if r.HPA == nil {
			t.Fatal("no HorizontalPodAutoscaler")
		}
		ref := r.HPA.Spec.ScaleTargetRef
		if ref.Kind != "Deployment" || ref.APIVersion != "apps/v1" || ref.Name != r.Deployment.Name {
			t.Errorf("scaleTargetRef %+v, want the Deployment %s", ref, r.Deployment.Name)
		}
		if *r.HPA.Spec.MinReplicas != 3 || r.HPA.Spec.MaxReplicas != 7 || len(r.HPA.Spec.Metrics) != 1 {
			t.Errorf("HPA spec %+v", r.HPA.Spec)
		}
		if r.Deployment.Spec.Replicas != nil {
			t.Error("the Deployment sets replicas although the autoscaler owns them")
		}
	})
	t.Run("servicemonitor", func(t *testing.T) {
		r := render(t, "serviceMonitor: {enabled: true, labels: {release: prometheus}}")
		sm := r.ServiceMonitor
		if sm == nil {
			t.Fatal("no ServiceMonitor")
		}
		if sm.Labels["release"] != "prometheus" {
			t.Errorf("labels %v lack release=prometheus", sm.Labels)
		}
		for k, v := range sm.Spec.Selector.MatchLabels {
			if r.Service.Labels[k] != v {
				t.Errorf("selector %s=%s does not select the Service (labels %v)", k, v, r.Service.Labels)
			}
		}
		if !slices.Equal(sm.Spec.NamespaceSelector.MatchNames, []string{"policy-engine"}) {
			t.Errorf("namespaceSelector %+v", sm.Spec.NamespaceSelector)
		}
		var ports []string
		for _, ep := range sm.Spec.Endpoints {
			ports = append(ports, ep.Port)
			if ep.Path != "/metrics" {
				t.Errorf("endpoint %s scrapes %q", ep.Port, ep.Path)
			}
		}
		var svcPorts []string
		for _, p := range r.Service.Spec.Ports {
			svcPorts = append(svcPorts, p.Name)
		}
		if !slices.Equal(ports, []string{"http-metrics", "agent-metrics"}) {
			t.Errorf("scraped ports %q, want the kernel's and the agent's metrics", ports)
		}
		for _, p := range ports {
			if !slices.Contains(svcPorts, p) {
				t.Errorf("the Service has no port %s", p)
			}
		}
	})
	t.Run("roll-on-config-change", func(t *testing.T) {
		a := render(t, "rollOnConfigChange: true")
		b := render(t, "rollOnConfigChange: true\nkernel: {config: {policy_kernel: {observability: {log_level: debug}}}}")
		sa, sb := a.Deployment.Spec.Template.Annotations["checksum/config"], b.Deployment.Spec.Template.Annotations["checksum/config"]
		if sa == "" || sa == sb {
			t.Errorf("checksum/config %q then %q: want one that follows the ConfigMap", sa, sb)
		}
		if !strings.Contains(b.Kernel, "log_level: debug") {
			t.Errorf("the value did not reach the kernel config:\n%s", b.Kernel)
		}
	})
	t.Run("sidecar", func(t *testing.T) {
		// Envoy in the pod (extraContainers): the kernel listens on the loopback only, and the
		// Service does not offer ext_proc to the rest of the cluster.
		r := render(t, `
kernel: {extProc: {address: 127.0.0.1}}
service: {exposeExtProc: false}
extraContainers:
  - name: envoy
    image: envoyproxy/envoy:v1.36.2
    args: ["-c", "/etc/envoy/envoy.yaml"]
    ports: [{name: http, containerPort: 10000}]
    volumeMounts: [{name: envoy-config, mountPath: /etc/envoy, readOnly: true}]
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
extraVolumes:
  - name: envoy-config
    configMap: {name: envoy}
`)
		kc, _ := r.configs(t)
		if kc.PolicyKernel.Server.Address != "127.0.0.1" {
			t.Errorf("kernel ext_proc address %q, want 127.0.0.1", kc.PolicyKernel.Server.Address)
		}
		names := []string{}
		for _, c := range r.Deployment.Spec.Template.Spec.Containers {
			names = append(names, c.Name)
		}
		if !slices.Equal(names, []string{"policy-engine", "envoy"}) {
			t.Errorf("containers %q", names)
		}
		if !slices.ContainsFunc(r.Deployment.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == "envoy-config" }) {
			t.Error("extraVolumes missing")
		}
		for _, p := range r.Service.Spec.Ports {
			if p.Name == "grpc-ext-proc" {
				t.Error("the Service offers ext_proc although the kernel listens on the loopback")
			}
		}
	})
}

// TestChartRefusesMistakes shows the strict decoding and the chart's own checks at work.
func TestChartRefusesMistakes(t *testing.T) {
	c := loadChart(t)
	// A field the API type does not have.
	r := &rendered{}
	if err := r.decode([]byte("apiVersion: apps/v1\nkind: Deployment\nspec:\n  replica: 2\n")); err == nil || !strings.Contains(err.Error(), "unknown field") {
		t.Errorf("unknown field: %v", err)
	}
	// Field names are case-sensitive, as for the API server.
	r = &rendered{}
	if err := r.decode([]byte("apiVersion: apps/v1\nkind: Deployment\nspec:\n  Replicas: 2\n")); err == nil {
		t.Error("a field in the wrong case was accepted")
	}
	r = &rendered{}
	if err := r.decode([]byte("apiVersion: v1\nkind: Service\nspec:\n  type: ClusterIP\n  type: NodePort\n")); err == nil {
		t.Error("a duplicate field was accepted")
	}
	// A misspelt value key: values.schema.json refuses it, naming it.
	if _, err := tryRender(c, "replicas: 3"); err == nil || !strings.Contains(err.Error(), "replicas") {
		t.Errorf("misspelt value: %v", err)
	}
	// A secret file outside the config directory, a kernel on a unix socket.
	if _, err := tryRender(c, "secrets: {files: [{path: /etc/passwd, secretName: x, key: y}]}"); err == nil {
		t.Error("an absolute secrets.files path was accepted")
	}
}

// TestChartLint runs Helm's own linter over the chart: nothing above INFO.
func TestChartLint(t *testing.T) {
	l := lint.All(chartDir, nil, "policy-engine", false)
	for _, m := range l.Messages {
		if m.Severity > support.InfoSev {
			t.Error(m)
		}
	}
}

// TestChartValuesDocumented: every value of values.yaml is in the README's table.
func TestChartValuesDocumented(t *testing.T) {
	b, err := os.ReadFile(chartDir + "/values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(chartDir + "/README.md")
	if err != nil {
		t.Fatal(err)
	}
	var vals map[string]any
	if err := yaml.Unmarshal(b, &vals); err != nil {
		t.Fatal(err)
	}
	// Whole values: the configs, and each probe's settings.
	whole := map[string]bool{"kernel.config": true, "agent.config": true, "probes.startup": true, "probes.liveness": true, "probes.readiness": true, "resources": true}
	var keys []string
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for _, k := range slices.Sorted(maps.Keys(m)) {
			key := prefix + k
			if sub, ok := m[k].(map[string]any); ok && len(sub) > 0 && !whole[key] {
				walk(key+".", sub)
				continue
			}
			keys = append(keys, key)
		}
	}
	walk("", vals)
	for _, k := range keys {
		if !strings.Contains(string(readme), "| `"+k+"` |") {
			t.Errorf("value %s is not in README.md's table", k)
		}
	}
	// And the table names no value that does not exist.
	for _, m := range regexp.MustCompile("(?m)^\\| `([^`]+)` \\|").FindAllStringSubmatch(string(readme), -1) {
		if !slices.Contains(keys, m[1]) {
			t.Errorf("README.md documents %s, which values.yaml does not have", m[1])
		}
	}
}

// TestChartValuesCommented: every value of the first two levels of values.yaml has a comment
// just above it (the configs and the probes' settings are commented as wholes).
func TestChartValuesCommented(t *testing.T) {
	b, err := os.ReadFile(chartDir + "/values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	// A key with its value on the same line; group headings (image:, kernel:) are not values.
	key := regexp.MustCompile(`^( {0,2})([A-Za-z][A-Za-z0-9]*):(.*)$`)
	var parent string
	for i, l := range lines {
		m := key.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		if m[1] == "" {
			parent = m[2]
		}
		if strings.TrimSpace(m[3]) == "" || (parent == "probes" && m[2] != "startup") || parent == "resources" {
			continue
		}
		prev := ""
		if i > 0 {
			prev = strings.TrimSpace(lines[i-1])
		}
		if !strings.HasPrefix(prev, "#") {
			t.Errorf("values.yaml:%d: %s has no comment above it", i+1, strings.TrimSpace(l))
		}
	}
}
