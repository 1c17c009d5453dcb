package yamlconf

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/santhosh-tekuri/jsonschema/v6/kind"
	"go.yaml.in/yaml/v3"
	"golang.org/x/text/language"
	"golang.org/x/text/message"
)

// Doc is a parsed config file that knows the line of every key, so that a problem found after
// decoding can still be reported as file:line: key: message.
type Doc struct {
	file string
	root *yaml.Node
}

// ParseDoc parses data, read from file.
func ParseDoc(file string, data []byte) (*Doc, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if doc.Kind == 0 || len(doc.Content) == 0 || isNull(doc.Content[0]) {
		return nil, fmt.Errorf("%s: empty config", file)
	}
	return &Doc{file: file, root: doc.Content[0]}, nil
}

// Errorf returns a problem at path, a dotted key path such as policy_kernel.agents[0].name,
// placed at the line of the path's key or, when the path is absent, of its nearest parent.
func (d *Doc) Errorf(path, format string, args ...any) *Error {
	return &Error{File: d.file, Line: d.Line(path), Key: path, Msg: fmt.Sprintf(format, args...)}
}

// Line returns the line of path's key, or of its nearest parent's when path is absent.
func (d *Doc) Line(path string) int {
	_, _, line := d.lookup(splitPath(path))
	return line
}

// splitPath splits a dotted key path into tokens: "a.b[2].c" → a, b, 2, c.
func splitPath(path string) []string {
	var toks []string
	for _, part := range strings.Split(path, ".") {
		for part != "" {
			i := strings.IndexByte(part, '[')
			if i < 0 {
				toks = append(toks, part)
				break
			}
			if i > 0 {
				toks = append(toks, part[:i])
			}
			j := strings.IndexByte(part[i:], ']')
			if j < 0 {
				toks = append(toks, part[i:])
				break
			}
			toks = append(toks, part[i+1:i+j])
			part = part[i+j+1:]
		}
	}
	return toks
}

// lookup follows tokens (map keys, list indexes) from the root. It returns the deepest node
// reached, the dotted path to it in yamlconf's notation, and the line of its key (of the item
// for a list item).
func (d *Doc) lookup(toks []string) (*yaml.Node, string, int) {
	n := d.root
	path := ""
	line := n.Line
	for _, t := range toks {
		if n.Kind == yaml.AliasNode {
			n = n.Alias
		}
		var next *yaml.Node
		nextLine := 0
		switch n.Kind {
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				if n.Content[i].Value == t {
					next, nextLine = n.Content[i+1], n.Content[i].Line
					break
				}
			}
			if next != nil {
				path = join(path, t)
			}
		case yaml.SequenceNode:
			if i, err := strconv.Atoi(t); err == nil && i >= 0 && i < len(n.Content) {
				next, nextLine = n.Content[i], n.Content[i].Line
				path += "[" + t + "]"
			}
		}
		if next == nil {
			return n, path, line
		}
		n, line = next, nextLine
	}
	return n, path, line
}

// Schema is a compiled JSON schema of a config file.
type Schema struct {
	s *jsonschema.Schema
}

// CompileSchema compiles a JSON schema; name is its location in error messages.
func CompileSchema(name string, data []byte) (*Schema, error) {
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("parse JSON schema %q: %w", name, err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource(name, doc); err != nil {
		return nil, fmt.Errorf("load JSON schema %q: %w", name, err)
	}
	s, err := c.Compile(name)
	if err != nil {
		return nil, fmt.Errorf("compile JSON schema %q: %w", name, err)
	}
	return &Schema{s: s}, nil
}

// MustCompileSchema is CompileSchema for schemas that ship with the binary; a broken one is a
// programming error.
func MustCompileSchema(name string, data []byte) *Schema {
	s, err := CompileSchema(name, data)
	if err != nil {
		panic("BUG: " + err.Error())
	}
	return s
}

var printer = message.NewPrinter(language.English)

// Validate checks the document against s and returns every violation as an *Error with its
// file, line and key, in document order.
func (d *Doc) Validate(s *Schema) []error {
	j, err := NodeJSON(d.root)
	if err != nil {
		return []error{&Error{File: d.file, Line: d.root.Line, Msg: err.Error()}}
	}
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(j))
	if err != nil {
		return []error{&Error{File: d.file, Line: d.root.Line, Msg: err.Error()}}
	}
	err = s.s.Validate(v)
	if err == nil {
		return nil
	}
	ve, ok := err.(*jsonschema.ValidationError)
	if !ok {
		return []error{&Error{File: d.file, Line: d.root.Line, Msg: err.Error()}}
	}
	var out []error
	seen := map[string]bool{}
	add := func(toks []string, msg string) {
		_, path, line := d.lookup(toks)
		key := fmt.Sprintf("%d\x00%s\x00%s", line, path, msg)
		if !seen[key] {
			seen[key] = true
			out = append(out, &Error{File: d.file, Line: line, Key: path, Msg: msg})
		}
	}
	for _, leaf := range leaves(ve, nil) {
		loc := leaf.InstanceLocation
		switch k := leaf.ErrorKind.(type) {
		case *kind.AdditionalProperties:
			for _, p := range k.Properties {
				add(append(loc[:len(loc):len(loc)], p), "unknown key")
			}
		case *kind.Required:
			for _, p := range k.Missing {
				_, path, line := d.lookup(loc)
				msg := "missing required key"
				if !seen[path+"."+p] {
					seen[path+"."+p] = true
					out = append(out, &Error{File: d.file, Line: line, Key: join(path, p), Msg: msg})
				}
			}
		case *kind.Minimum:
			add(loc, fmt.Sprintf("must be at least %s, got %s", k.Want.RatString(), k.Got.RatString()))
		case *kind.Maximum:
			add(loc, fmt.Sprintf("must be at most %s, got %s", k.Want.RatString(), k.Got.RatString()))
		default:
			add(loc, leaf.ErrorKind.LocalizedString(printer))
		}
	}
	sortErrors(out)
	return out
}

// leaves returns the errors of a validation result that have no causes: the actual problems.
func leaves(e *jsonschema.ValidationError, out []*jsonschema.ValidationError) []*jsonschema.ValidationError {
	if len(e.Causes) == 0 {
		return append(out, e)
	}
	for _, c := range e.Causes {
		out = leaves(c, out)
	}
	return out
}

// sortErrors orders *Errors by line, then key, keeping others at the end in their order.
func sortErrors(errs []error) {
	less := func(a, b error) bool {
		x, ok1 := a.(*Error)
		y, ok2 := b.(*Error)
		if !ok1 || !ok2 {
			return ok1 && !ok2
		}
		if x.Line != y.Line {
			return x.Line < y.Line
		}
		return x.Key < y.Key
	}
	for i := 1; i < len(errs); i++ {
		for j := i; j > 0 && less(errs[j], errs[j-1]); j-- {
			errs[j], errs[j-1] = errs[j-1], errs[j]
		}
	}
}

// Problems collects the problems of a config file, at most one per key: the first one reported
// for a key wins, so a check with a precise message can run before a schema that would say the
// same thing more vaguely.
type Problems struct {
	doc  *Doc
	errs []error
	keys map[string]bool
	// late are the schema's problems, added by Err after every other so that a check's own
	// message for a key wins over the schema's.
	late []error
}

// DecodeWithSchema parses data, read from file, decodes it strictly into the struct that dst
// points to, and validates it against schema. When the file cannot be parsed or decoded it
// returns an error holding every problem, the schema's included. Otherwise it returns the
// file's Problems for the caller's own checks; Err then adds the schema's problems, for the
// keys that no check reported.
func DecodeWithSchema(file string, data []byte, dst any, schema *Schema) (*Problems, error) {
	doc, err := ParseDoc(file, data)
	if err != nil {
		return nil, err
	}
	probs := NewProblems(doc)
	if err := doc.decode(dst); err != nil {
		probs.Add(err)
		probs.Add(doc.Validate(schema)...)
		return nil, probs.Err()
	}
	probs.late = doc.Validate(schema)
	return probs, nil
}

// NewProblems returns an empty collection for doc.
func NewProblems(doc *Doc) *Problems {
	return &Problems{doc: doc, keys: map[string]bool{}}
}

// Add adds errors; errors.Join results are split into their parts.
func (p *Problems) Add(errs ...error) {
	for _, err := range errs {
		if err == nil {
			continue
		}
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			p.Add(j.Unwrap()...)
			continue
		}
		if e, ok := err.(*Error); ok && e.Key != "" {
			if p.keys[e.Key] {
				continue
			}
			p.keys[e.Key] = true
		}
		p.errs = append(p.errs, err)
	}
}

// Addf adds a problem at path (see Doc.Errorf).
func (p *Problems) Addf(path, format string, args ...any) {
	p.Add(p.doc.Errorf(path, format, args...))
}

// Err returns every problem in document order, joined, or nil. The schema's problems of
// DecodeWithSchema are among them, but for the keys that another problem already names.
func (p *Problems) Err() error {
	p.Add(p.late...)
	p.late = nil
	if len(p.errs) == 0 {
		return nil
	}
	sortErrors(p.errs)
	return errors.Join(p.errs...)
}
