// Package helmtest renders the Helm chart of deploy/helm/policy-engine with Helm's own library
// and holds every object to its Kubernetes API type (strictly: an unknown field is an error)
// and to the binaries it runs.
package helmtest

import (
	"bytes"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

const (
	repoRoot = "../../"
	chartDir = repoRoot + "deploy/helm/policy-engine"
)

// rendered is one rendering of the chart, every object decoded into its API type.
type rendered struct {
	ConfigMap      *corev1.ConfigMap
	Service        *corev1.Service
	ServiceAccount *corev1.ServiceAccount
	Deployment     *appsv1.Deployment
	PDB            *policyv1.PodDisruptionBudget
	HPA            *autoscalingv2.HorizontalPodAutoscaler
	ServiceMonitor *monitoringv1.ServiceMonitor
	// Kernel and Agent are the ConfigMap's two config files.
	Kernel, Agent string
}

func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	c, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("load the chart: %v", err)
	}
	return c
}

// render renders the chart with values over its defaults (a YAML document, may be empty) for
// release "policy-engine" in namespace "policy-engine", and decodes every object strictly.
func render(t *testing.T, values string) *rendered {
	t.Helper()
	r, err := tryRender(loadChart(t), values)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func tryRender(c *chart.Chart, values string) (*rendered, error) {
	vals := map[string]any{}
	if err := yaml.UnmarshalStrict([]byte(values), &vals); err != nil {
		return nil, fmt.Errorf("values: %w", err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	caps.APIVersions = append(caps.APIVersions, "monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor")
	rv, err := chartutil.ToRenderValues(c, vals, chartutil.ReleaseOptions{Name: "policy-engine", Namespace: "policy-engine", IsInstall: true}, caps)
	if err != nil {
		return nil, fmt.Errorf("render values: %w", err)
	}
	files, err := engine.Render(c, rv)
	if err != nil {
		return nil, fmt.Errorf("render: %w", err)
	}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	r := &rendered{}
	for _, name := range names {
		if path.Ext(name) != ".yaml" {
			continue // _helpers.tpl, NOTES.txt
		}
		for i, doc := range bytes.Split([]byte(files[name]), []byte("\n---")) {
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			if err := r.decode(doc); err != nil {
				return nil, fmt.Errorf("%s (document %d): %w\n%s", name, i, err, doc)
			}
		}
	}
	if r.ConfigMap != nil {
		r.Kernel, r.Agent = r.ConfigMap.Data["kernel-config.yaml"], r.ConfigMap.Data["agent-config.yaml"]
	}
	return r, nil
}

func stripComments(doc []byte) []byte {
	var out [][]byte
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// strictYAML decodes a YAML document into v as the API server's strict field validation does:
// field names are case-sensitive, and a field the type does not have, or one given twice, is an
// error (encoding/json, and so sigs.k8s.io/yaml's UnmarshalStrict, would match "failopen" to
// failOpen).
func strictYAML(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strict, err := sigsjson.UnmarshalStrict(j, v)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

// decode decodes one object into its API type with strictYAML.
func (r *rendered) decode(doc []byte) error {
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &head); err != nil {
		return err
	}
	var into any
	switch head.APIVersion + " " + head.Kind {
	case "v1 ConfigMap":
		r.ConfigMap = once(r.ConfigMap)
		into = r.ConfigMap
	case "v1 Service":
		r.Service = once(r.Service)
		into = r.Service
	case "v1 ServiceAccount":
		r.ServiceAccount = once(r.ServiceAccount)
		into = r.ServiceAccount
	case "apps/v1 Deployment":
		r.Deployment = once(r.Deployment)
		into = r.Deployment
	case "policy/v1 PodDisruptionBudget":
		r.PDB = once(r.PDB)
		into = r.PDB
	case "autoscaling/v2 HorizontalPodAutoscaler":
		r.HPA = once(r.HPA)
		into = r.HPA
	case "monitoring.coreos.com/v1 ServiceMonitor":
		r.ServiceMonitor = once(r.ServiceMonitor)
		into = r.ServiceMonitor
	default:
		return fmt.Errorf("unexpected object %s %s", head.APIVersion, head.Kind)
	}
	if into == nil {
		return fmt.Errorf("a second %s", head.Kind)
	}
	return strictYAML(doc, into)
}

// once returns a new T, or nil when there already is one.
func once[T any](have *T) *T {
	if have != nil {
		return nil
	}
	return new(T)
}

// container returns the Deployment's policy-engine container.
func (r *rendered) container(t *testing.T) *corev1.Container {
	t.Helper()
	for i, c := range r.Deployment.Spec.Template.Spec.Containers {
		if c.Name == "policy-engine" {
			return &r.Deployment.Spec.Template.Spec.Containers[i]
		}
	}
	t.Fatal("no container policy-engine")
	return nil
}

// port returns the containerPort named name.
func port(t *testing.T, c *corev1.Container, name string) int32 {
	t.Helper()
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	t.Fatalf("container %s has no port named %q", c.Name, name)
	return 0
}

// volumeAt returns the volume mounted at dir.
func (r *rendered) volumeAt(t *testing.T, dir string) (*corev1.Volume, corev1.VolumeMount) {
	t.Helper()
	c := r.container(t)
	for _, m := range c.VolumeMounts {
		if m.MountPath == dir {
			for i, v := range r.Deployment.Spec.Template.Spec.Volumes {
				if v.Name == m.Name {
					return &r.Deployment.Spec.Template.Spec.Volumes[i], m
				}
			}
			t.Fatalf("mount %s names no volume (%s)", dir, m.Name)
		}
	}
	t.Fatalf("nothing is mounted at %s", dir)
	return nil, corev1.VolumeMount{}
}

// mountUnder returns the mount that holds file, the deepest one.
func mountUnder(c *corev1.Container, file string) (corev1.VolumeMount, bool) {
	var best corev1.VolumeMount
	found := false
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/") && len(m.MountPath) >= len(best.MountPath) {
			best, found = m, true
		}
	}
	return best, found
}
