// Package yamlconf decodes YAML config files strictly, with errors that name the file, the line
// and the key: an unknown key, a value of the wrong type and a missing required key are all
// errors, and every problem in a file is reported at once.
//
// Struct fields are named by their yaml tag. A field tagged `required:"true"` must be present.
package yamlconf

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Decode decodes data, read from file, into the struct that dst points to.
func Decode(file string, data []byte, dst any) error {
	doc, err := ParseDoc(file, data)
	if err != nil {
		return err
	}
	return doc.decode(dst)
}

// decode decodes the document into the struct that dst points to, after checking every key
// and value against the struct's fields.
func (d *Doc) decode(dst any) error {
	c := checker{file: d.file}
	c.check(d.root, reflect.TypeOf(dst).Elem(), "")
	if len(c.errs) > 0 {
		return errors.Join(c.errs...)
	}
	if err := d.root.Decode(dst); err != nil {
		return fmt.Errorf("%s: %w", d.file, err)
	}
	return nil
}

// Error is one problem in a config file.
type Error struct {
	File string
	Line int
	Key  string // dotted path, e.g. policy_kernel.agents[0].timeout_ms
	Msg  string
}

func (e *Error) Error() string {
	if e.Key == "" {
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	}
	return fmt.Sprintf("%s:%d: %s: %s", e.File, e.Line, e.Key, e.Msg)
}

type checker struct {
	file string
	errs []error
}

func (c *checker) add(n *yaml.Node, key, format string, args ...any) {
	c.errs = append(c.errs, &Error{File: c.file, Line: n.Line, Key: key, Msg: fmt.Sprintf(format, args...)})
}

var (
	unmarshalerType = reflect.TypeOf((*yaml.Unmarshaler)(nil)).Elem()
	durationType    = reflect.TypeOf(time.Duration(0))
)

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func (c *checker) check(n *yaml.Node, t reflect.Type, path string) {
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // an explicit null leaves the zero value
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) || t.Implements(unmarshalerType) {
		v := reflect.New(t)
		if err := n.Decode(v.Interface()); err != nil {
			c.add(n, path, "%v", trimYAMLError(err))
		}
		return
	}
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		c.checkStruct(n, t, path)
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			c.add(n, path, "want a list, got %s", describe(n))
			return
		}
		for i, e := range n.Content {
			c.check(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i))
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			c.add(n, path, "want a map, got %s", describe(n))
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k := n.Content[i]
			c.check(n.Content[i+1], t.Elem(), join(path, k.Value))
		}
	case reflect.Interface:
		// Anything goes.
	default:
		c.checkScalar(n, t, path)
	}
}

func (c *checker) checkStruct(n *yaml.Node, t reflect.Type, path string) {
	if n.Kind != yaml.MappingNode {
		c.add(n, path, "want a map, got %s", describe(n))
		return
	}
	fields := map[string]reflect.StructField{}
	var names []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := yamlName(f)
		if name == "" {
			continue
		}
		fields[name] = f
		names = append(names, name)
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		f, ok := fields[k.Value]
		if !ok {
			sort.Strings(names)
			c.add(k, join(path, k.Value), "unknown key (known keys: %s)", strings.Join(names, ", "))
			continue
		}
		if seen[k.Value] {
			c.add(k, join(path, k.Value), "duplicate key")
		}
		seen[k.Value] = true
		if f.Tag.Get("required") == "true" && isNull(v) {
			c.add(v, join(path, k.Value), "must not be null")
			continue
		}
		c.check(v, f.Type, join(path, k.Value))
	}
	for _, name := range names {
		if fields[name].Tag.Get("required") == "true" && !seen[name] {
			c.add(n, join(path, name), "missing required key")
		}
	}
}

func (c *checker) checkScalar(n *yaml.Node, t reflect.Type, path string) {
	if n.Kind != yaml.ScalarNode {
		c.add(n, path, "want %s, got %s", kindName(t), describe(n))
		return
	}
	if t == durationType {
		if _, err := time.ParseDuration(n.Value); err != nil {
			c.add(n, path, "want a duration such as \"250ms\", got %q", n.Value)
		}
		return
	}
	var err error
	switch t.Kind() {
	case reflect.String:
		return
	case reflect.Bool:
		var b bool
		err = n.Decode(&b)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		_, err = strconv.ParseInt(n.Value, 0, t.Bits())
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		_, err = strconv.ParseUint(n.Value, 0, t.Bits())
	case reflect.Float32, reflect.Float64:
		_, err = strconv.ParseFloat(n.Value, t.Bits())
	default:
		err = n.Decode(reflect.New(t).Interface())
	}
	if err != nil {
		c.add(n, path, "want %s, got %q", kindName(t), n.Value)
	}
}

// isNull reports whether n is an explicit or implicit null ("~", "null", or nothing).
func isNull(n *yaml.Node) bool {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

func yamlName(f reflect.StructField) string {
	if !f.IsExported() {
		return ""
	}
	tag := f.Tag.Get("yaml")
	if tag == "-" {
		return ""
	}
	name, _, _ := strings.Cut(tag, ",")
	if name == "" {
		return strings.ToLower(f.Name)
	}
	return name
}

func kindName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "an integer"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a non-negative integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	}
	return t.String()
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a map"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return strconv.Quote(n.Value)
	}
	return "an alias"
}

// trimYAMLError drops the parts of a decoding error that the Error around it already says:
// yaml's preamble and the line number.
func trimYAMLError(err error) string {
	s := strings.TrimPrefix(err.Error(), "yaml: unmarshal errors:\n  ")
	if rest, ok := strings.CutPrefix(s, "line "); ok {
		if i := strings.Index(rest, ": "); i > 0 && strings.Trim(rest[:i], "0123456789") == "" {
			s = rest[i+2:]
		}
	}
	return s
}

// Metadata is a chain entry's metadata: a YAML map whose scalar values are kept as their text
// and whose lists and maps become JSON text, because the agent API carries map<string,string>.
type Metadata map[string]string

// UnmarshalYAML implements yaml.Unmarshaler.
func (m *Metadata) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.MappingNode {
		return fmt.Errorf("line %d: want a map, got %s", n.Line, describe(n))
	}
	out := make(Metadata, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if v.Kind == yaml.AliasNode {
			v = v.Alias
		}
		switch v.Kind {
		case yaml.ScalarNode:
			if v.Tag == "!!null" {
				out[k.Value] = ""
			} else {
				out[k.Value] = v.Value
			}
		default:
			j, err := NodeJSON(v)
			if err != nil {
				return fmt.Errorf("line %d: key %q: %w", v.Line, k.Value, err)
			}
			out[k.Value] = string(j)
		}
	}
	*m = out
	return nil
}

// Raw is a YAML subtree kept as JSON, for settings whose schema belongs to someone else
// (a policy's config section).
type Raw json.RawMessage

// UnmarshalYAML implements yaml.Unmarshaler.
func (r *Raw) UnmarshalYAML(n *yaml.Node) error {
	j, err := NodeJSON(n)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*r = j
	return nil
}

// NodeJSON converts a YAML node to JSON text.
func NodeJSON(n *yaml.Node) ([]byte, error) {
	var v any
	if err := n.Decode(&v); err != nil {
		return nil, err
	}
	v, err := jsonable(v)
	if err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

// jsonable turns YAML's map[any]any-free values into JSON-encodable ones: keys must be strings.
func jsonable(v any) (any, error) {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			j, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			x[k] = j
		}
		return x, nil
	case map[any]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			var ks string
			switch kv := k.(type) {
			case string:
				ks = kv
			case int, int64, uint64, float64, bool:
				ks = fmt.Sprint(kv) // JSON object keys are strings
			default:
				return nil, fmt.Errorf("map key %v is not a scalar", k)
			}
			j, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			out[ks] = j
		}
		return out, nil
	case []any:
		for i, e := range x {
			j, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			x[i] = j
		}
		return x, nil
	}
	return v, nil
}
