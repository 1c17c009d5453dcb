package allowall

import (
	"context"
	"testing"

	"github.com/policy-engine/policy-engine/agent/policy"
)

func TestAllowAll(t *testing.T) {
	m, ok := policy.Lookup(Name)
	if !ok || m.Phases != policy.Both {
		t.Fatal("allowAll not registered for both phases")
	}
	f, err := m.New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := f.Build(nil)
	if err != nil {
		t.Fatal(err)
	}
	r, err := p.Execute(context.Background(), &policy.Context{})
	if err != nil || r.Status != 0 || len(r.Instructions) != 0 {
		t.Fatalf("%v %v", r, err)
	}
	if _, err := f.Build(map[string]string{"x": "1"}); err == nil {
		t.Fatal("allowAll takes no metadata")
	}
}
