// Package bodytransform is the responseBodyTransform policy: it removes and renames fields of
// JSON response bodies, for instance internal ids that clients must not see.
//
// Fields are named by dotted paths from the top of the document. An array on the way is
// transparent: "items.internal_id" removes internal_id from every element of items, and a path
// that starts at a top-level array applies to each element. A segment of digits also selects
// one element: "items.0.internal_id" touches only the first.
//
// The body is edited in one pass without being decoded (package jsonedit), so member order,
// whitespace and number literals are kept exactly, and a body that needs no change gets no
// SET_BODY instruction at all.
//
// A field that the configuration removes must never reach the client, so a body that may hold
// it and cannot be edited is refused: the policy fails, and the chain entry's on_failure decides
// (deny by default: the kernel answers 500). A body is JSON when its content-type names JSON
// (application/json, text/json, anything +json, in any case, with parameters), or when it has
// no content-type and looks like JSON. gzip and deflate bodies are decoded (never past
// max_body_bytes) and an edited body is sent as identity; other codings, bodies over
// max_body_bytes, nested deeper than max_depth or that do not parse are refused. A UTF-8 byte
// order mark and an anti-hijacking guard such as ")]}'" before the JSON text are kept as they
// are. Bodies of other content types pass unchanged.
package bodytransform

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/VictoriaMetrics/metrics"

	"github.com/policy-engine/policy-engine/agent/policy"
	"github.com/policy-engine/policy-engine/policies/bodytransform/jsonedit"
)

// Name is the policy's name in chains.
const Name = "responseBodyTransform"

// Defaults of the metadata.
const (
	DefaultMaxBodyBytes = 1 << 20
	DefaultMaxDepth     = 256
	// MaxDepthLimit bounds max_depth: the scan is iterative, but a cap keeps hostile bodies
	// cheap.
	MaxDepthLimit = 10000
)

const schema = `{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","additionalProperties":false,` +
	`"anyOf":[{"required":["remove_fields"]},{"required":["rename_fields"]}],"properties":{` +
	`"remove_fields":{"type":"array","items":{"type":"string","pattern":"^[^.]+(\\.[^.]+)*$"},` +
	`"description":"dotted paths of fields to remove; arrays on the way apply the rest of the path to each element, a segment of digits selects one element"},` +
	`"rename_fields":{"type":"object","propertyNames":{"pattern":"^[^.]+(\\.[^.]+)*$"},"additionalProperties":{"type":"string","minLength":1},` +
	`"description":"dotted path of a field to its new name (a name, not a path: the field stays where it is)"},` +
	`"max_body_bytes":{"type":"integer","minimum":1,"default":1048576,"description":"JSON bodies larger than this, as received or once decoded, are refused"},` +
	`"max_depth":{"type":"integer","minimum":1,"maximum":10000,"default":256,"description":"JSON bodies nested deeper are refused"}}}`

// Settings are a chain entry's metadata.
type Settings struct {
	RemoveFields []string          `json:"remove_fields"`
	RenameFields map[string]string `json:"rename_fields"`
	MaxBodyBytes int               `json:"max_body_bytes"`
	MaxDepth     int               `json:"max_depth"`
}

// Reasons: a body of another content type passes unchanged, counted in
// policy_agent_body_transform_skipped_total{reason="not_json"}; the others are why a body was
// refused, the reason label of policy_agent_body_transform_refused_total.
const (
	ReasonNotJSON             = "not_json"
	ReasonTooLarge            = "too_large"
	ReasonInvalidJSON         = "invalid_json"
	ReasonTooDeep             = "too_deep"
	ReasonUnsupportedEncoding = "unsupported_encoding"
	ReasonBadEncoding         = "bad_encoding"
)

var (
	notJSON = metrics.GetOrCreateCounter(`policy_agent_body_transform_skipped_total{reason="not_json"}`)
	refused = map[string]*metrics.Counter{}
)

func init() {
	for _, r := range []string{ReasonTooLarge, ReasonInvalidJSON, ReasonTooDeep, ReasonUnsupportedEncoding, ReasonBadEncoding} {
		refused[r] = metrics.GetOrCreateCounter(`policy_agent_body_transform_refused_total{reason="` + r + `"}`)
	}
	policy.Register(policy.Module{
		Name:        Name,
		Version:     "1.1.0",
		Description: "Removes and renames fields of JSON response bodies; refuses a JSON body it cannot edit.",
		Phases:      policy.Response,
		// In the response phase it reads only the response and the state.
		ResponseIgnoresRequest: true,
		ResponseBody:           true,
		MetadataSchema:         schema,
		New: func(policy.Config) (policy.Factory, error) {
			return policy.FactoryFunc(Build), nil
		},

		NotCacheable: "it transforms the body, which a key cannot read",
	})
}

// node is a segment of the configured paths. The paths form a tree; the state of a JSON value
// during the scan is the set of nodes whose children can match the value's members.
type node struct {
	children map[string]*node
	op       jsonedit.Op // Remove or Rename when a path ends here, else Keep
	newKey   []byte      // Rename: the new key, quoted
	// indexed reports that some child's name is all digits, so array elements need a lookup.
	indexed bool
	// self is the one-node set {n}, so that the common case of one matching path allocates
	// nothing.
	self []*node
}

func newNode() *node {
	n := &node{children: map[string]*node{}}
	n.self = []*node{n}
	return n
}

// Transform is a compiled chain entry.
type Transform struct {
	root     *node
	maxBody  int
	maxDepth int
}

// Build compiles a chain entry's metadata.
func Build(md map[string]string) (policy.Policy, error) {
	s := Settings{MaxBodyBytes: DefaultMaxBodyBytes, MaxDepth: DefaultMaxDepth}
	if err := policy.DecodeMetadata(md, &s); err != nil {
		return nil, err
	}
	var errs []error
	if len(s.RemoveFields) == 0 && len(s.RenameFields) == 0 {
		errs = append(errs, errors.New("remove_fields or rename_fields must name at least one field"))
	}
	if s.MaxBodyBytes < 1 {
		errs = append(errs, fmt.Errorf("max_body_bytes: must be positive, got %d", s.MaxBodyBytes))
	}
	if s.MaxDepth < 1 || s.MaxDepth > MaxDepthLimit {
		errs = append(errs, fmt.Errorf("max_depth: must be between 1 and %d, got %d", MaxDepthLimit, s.MaxDepth))
	}
	p := &Transform{root: newNode(), maxBody: s.MaxBodyBytes, maxDepth: s.MaxDepth}
	for i, path := range s.RemoveFields {
		n, err := p.add(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("remove_fields[%d]: %w", i, err))
			continue
		}
		n.op = jsonedit.Remove
	}
	olds := make([]string, 0, len(s.RenameFields))
	for old := range s.RenameFields {
		olds = append(olds, old)
	}
	sort.Strings(olds)
	for _, old := range olds {
		name := s.RenameFields[old]
		if name == "" {
			errs = append(errs, fmt.Errorf("rename_fields[%q]: the new name is empty", old))
			continue
		}
		n, err := p.add(old)
		if err != nil {
			errs = append(errs, fmt.Errorf("rename_fields[%q]: %w", old, err))
			continue
		}
		if n.op == jsonedit.Remove {
			errs = append(errs, fmt.Errorf("rename_fields[%q]: the field is also in remove_fields", old))
			continue
		}
		n.op = jsonedit.Rename
		n.newKey, _ = json.Marshal(name)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return p, nil
}

// add puts a dotted path into the tree and returns its last node.
func (p *Transform) add(path string) (*node, error) {
	segs := strings.Split(path, ".")
	if len(segs) > MaxDepthLimit {
		return nil, fmt.Errorf("path %.40q...: more than %d segments", path, MaxDepthLimit)
	}
	n := p.root
	for _, seg := range segs {
		if seg == "" {
			return nil, fmt.Errorf("path %q: empty segment", path)
		}
		c := n.children[seg]
		if c == nil {
			c = newNode()
			n.children[seg] = c
			if isIndex(seg) {
				n.indexed = true
			}
		}
		n = c
	}
	return n, nil
}

func isIndex(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// Member looks the key up under every node of the set: a path that ends there decides the
// action (removal wins over renaming), and paths that go on make the value's set.
func (p *Transform) Member(set []*node, key []byte) (jsonedit.Action, []*node) {
	var (
		act  jsonedit.Action
		next []*node
	)
	for _, n := range set {
		c := n.children[string(key)]
		if c == nil {
			continue
		}
		switch {
		case c.op == jsonedit.Remove:
			act = jsonedit.Action{Op: jsonedit.Remove}
		case c.op == jsonedit.Rename && act.Op != jsonedit.Remove:
			act = jsonedit.Action{Op: jsonedit.Rename, Raw: c.newKey}
		}
		if len(c.children) > 0 {
			next = union(next, c)
		}
	}
	return act, next
}

// Element gives an array element its array's set, plus the nodes that name its index.
func (p *Transform) Element(set []*node, i int) []*node {
	next := set
	var buf [20]byte
	for _, n := range set {
		if !n.indexed {
			continue
		}
		if c := n.children[string(strconv.AppendInt(buf[:0], int64(i), 10))]; c != nil {
			next = union(next, c)
		}
	}
	return next
}

// union adds n to a set without changing the set's backing array, which other values share.
func union(set []*node, n *node) []*node {
	if len(set) == 0 {
		return n.self
	}
	out := make([]*node, len(set), len(set)+1)
	copy(out, set)
	return append(out, n)
}

// Execute transforms the response body. A JSON body it cannot edit is a *RefusedError.
func (p *Transform) Execute(_ context.Context, c *policy.Context) (policy.Result, error) {
	r := c.Response
	if r == nil || len(r.Body) == 0 {
		return policy.Result{}, nil
	}
	kind := classify(r.Headers["content-type"])
	if kind == kindOther {
		notJSON.Inc()
		return policy.Result{}, nil
	}
	if kind == kindJSON && len(r.Body) > p.maxBody {
		return refuse(ReasonTooLarge, fmt.Errorf("%d bytes, more than max_body_bytes (%d)", len(r.Body), p.maxBody))
	}
	enc := r.Headers["content-encoding"]
	var buf *[]byte
	if enc != "" {
		buf = getBuf()
		defer putBuf(buf)
	}
	text, decoded, err := decodeBody(enc, r.Body, p.maxBody, buf)
	if kind == kindUnknown {
		// Without a content-type, what looks like JSON is JSON; what cannot be looked at is
		// refused.
		if text != nil && !looksLikeJSON(text) {
			notJSON.Inc()
			return policy.Result{}, nil
		}
		if err == nil && len(r.Body) > p.maxBody {
			return refuse(ReasonTooLarge, fmt.Errorf("%d bytes, more than max_body_bytes (%d)", len(r.Body), p.maxBody))
		}
	}
	switch {
	case errors.Is(err, errDecodedTooLarge):
		return refuse(ReasonTooLarge, fmt.Errorf("decoded, more than max_body_bytes (%d)", p.maxBody))
	case errors.Is(err, errUnsupportedCoding):
		return refuse(ReasonUnsupportedEncoding, err)
	case err != nil:
		return refuse(ReasonBadEncoding, err)
	}
	n, _ := splitPrefix(text)
	if blank(text[n:]) {
		return policy.Result{}, nil // no document, so nothing to remove
	}
	out, changed, err := p.Apply(text[n:])
	switch {
	case errors.Is(err, jsonedit.ErrTooDeep):
		return refuse(ReasonTooDeep, err)
	case err != nil:
		return refuse(ReasonInvalidJSON, err)
	case !changed:
		// The body as received passes, encoded or not: it holds nothing to edit.
		return policy.Result{}, nil
	}
	if n > 0 {
		// The prefix may be in buf: the new body gets a copy.
		out = append(append(make([]byte, 0, n+len(out)), text[:n]...), out...)
	}
	if !decoded {
		return policy.Allow(policy.SetBody(out)), nil
	}
	// The edited body goes out as identity: its coding and length headers go in the same
	// reply, which Envoy applies because the body is buffered.
	return policy.Allow(policy.SetBody(out), policy.RemoveHeader("content-encoding"), policy.RemoveHeader("content-length")), nil
}

// blank reports whether b holds only JSON whitespace.
func blank(b []byte) bool {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return false
		}
	}
	return true
}

// RefusedError is a body the policy cannot edit, so that the fields it must remove could reach
// the client. Reason is the reason label of policy_agent_body_transform_refused_total.
type RefusedError struct {
	Reason string
	Err    error
}

func (e *RefusedError) Error() string {
	return "response body refused (" + e.Reason + "): " + e.Err.Error()
}

func (e *RefusedError) Unwrap() error { return e.Err }

func refuse(reason string, err error) (policy.Result, error) {
	refused[reason].Inc()
	return policy.Result{}, &RefusedError{Reason: reason, Err: err}
}

// bufs holds the buffers that bodies are decoded into. A buffer that grew above maxPooledBuf
// is left to the collector, so that one large body does not pin its memory.
var bufs sync.Pool

const maxPooledBuf = 256 << 10

func getBuf() *[]byte {
	if b, ok := bufs.Get().(*[]byte); ok {
		return b
	}
	return new([]byte)
}

func putBuf(b *[]byte) {
	if cap(*b) > maxPooledBuf {
		return
	}
	*b = (*b)[:0]
	bufs.Put(b)
}

// Apply transforms a JSON document: it returns the new document and whether it differs. An
// unchanged document is returned as it is.
func (p *Transform) Apply(body []byte) ([]byte, bool, error) {
	return jsonedit.Edit(body, p.maxDepth, p.root.self, jsonedit.Visitor[[]*node](p))
}

var (
	_ policy.Policy             = (*Transform)(nil)
	_ jsonedit.Visitor[[]*node] = (*Transform)(nil)
)
