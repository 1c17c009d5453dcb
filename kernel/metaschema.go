package kernel

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/santhosh-tekuri/jsonschema/v6/kind"
	"golang.org/x/text/language"
	"golang.org/x/text/message"
)

// Chain metadata travels as map<string,string>: YAML scalars as their text, lists and maps as
// JSON. A policy's metadata_schema describes the typed settings, so before validation each
// value is read back as the type its property declares, the way the agent's
// policy.DecodeMetadata reads it: "true" for a boolean, "100" for an integer, JSON text for an
// array or object. A value that does not parse stays a string, and the schema says what is
// wrong with it.

// metadataSchema is a policy's compiled metadata schema with the declared types of its
// top-level properties.
type metadataSchema struct {
	schema *jsonschema.Schema
	types  map[string][]string // property → its "type" keyword
}

var (
	schemaMu    sync.Mutex
	schemaCache = map[string]*metadataSchema{} // by schema text; agents publish few
)

// compileMetadataSchema compiles a schema text once; an empty text means no schema.
func compileMetadataSchema(text string) (*metadataSchema, error) {
	if strings.TrimSpace(text) == "" {
		return nil, nil
	}
	schemaMu.Lock()
	defer schemaMu.Unlock()
	if ms, ok := schemaCache[text]; ok {
		return ms, nil
	}
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("parse metadata schema: %w", err)
	}
	c := jsonschema.NewCompiler()
	const loc = "metadata-schema.json"
	if err := c.AddResource(loc, doc); err != nil {
		return nil, fmt.Errorf("load metadata schema: %w", err)
	}
	s, err := c.Compile(loc)
	if err != nil {
		return nil, fmt.Errorf("compile metadata schema: %w", err)
	}
	ms := &metadataSchema{schema: s, types: propertyTypes(doc)}
	schemaCache[text] = ms
	return ms, nil
}

// propertyTypes reads the "type" keyword of each top-level property of a schema document.
func propertyTypes(doc any) map[string][]string {
	out := map[string][]string{}
	root, _ := doc.(map[string]any)
	props, _ := root["properties"].(map[string]any)
	for name, p := range props {
		pm, _ := p.(map[string]any)
		switch t := pm["type"].(type) {
		case string:
			out[name] = []string{t}
		case []any:
			for _, x := range t {
				if s, ok := x.(string); ok {
					out[name] = append(out[name], s)
				}
			}
		}
	}
	return out
}

// coerce reads a metadata value as the type its property declares.
func coerce(v string, types []string) any {
	if len(types) == 0 {
		// Undeclared: JSON text for lists and maps, else the string.
		if t := strings.TrimSpace(v); strings.HasPrefix(t, "{") || strings.HasPrefix(t, "[") {
			if x, ok := decodeJSON(t); ok {
				return x
			}
		}
		return v
	}
	for _, t := range types {
		switch t {
		case "boolean":
			if b, err := strconv.ParseBool(v); err == nil {
				return b
			}
		case "integer":
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
				return n
			}
		case "number":
			if f, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
				return json.Number(strconv.FormatFloat(f, 'g', -1, 64))
			}
		case "array", "object":
			if x, ok := decodeJSON(v); ok {
				if _, isArr := x.([]any); isArr == (t == "array") {
					return x
				}
			}
		case "null":
			if v == "" || v == "null" {
				return nil
			}
		}
	}
	return v
}

func decodeJSON(s string) (any, bool) {
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	var x any
	if err := dec.Decode(&x); err != nil || dec.More() {
		return nil, false
	}
	return x, true
}

var schemaPrinter = message.NewPrinter(language.English)

// metadataProblem is a problem with a chain entry's metadata; key is the metadata key it is
// about, empty for the map as a whole.
type metadataProblem struct {
	key, msg string
}

// validate checks metadata against the schema and returns every problem, sorted by key.
func (ms *metadataSchema) validate(md map[string]string) []metadataProblem {
	if ms == nil {
		return nil
	}
	inst := make(map[string]any, len(md))
	for k, v := range md {
		inst[k] = coerce(v, ms.types[k])
	}
	err := ms.schema.Validate(inst)
	if err == nil {
		return nil
	}
	ve, ok := err.(*jsonschema.ValidationError)
	if !ok {
		return []metadataProblem{{msg: err.Error()}}
	}
	var out []metadataProblem
	var walk func(e *jsonschema.ValidationError)
	walk = func(e *jsonschema.ValidationError) {
		if len(e.Causes) > 0 {
			for _, c := range e.Causes {
				walk(c)
			}
			return
		}
		p := metadataProblem{msg: e.ErrorKind.LocalizedString(schemaPrinter)}
		if len(e.InstanceLocation) > 0 {
			p.key = strings.Join(e.InstanceLocation, ".")
		}
		if k, ok := e.ErrorKind.(*kind.AdditionalProperties); ok && len(e.InstanceLocation) == 0 {
			for _, name := range k.Properties {
				out = append(out, metadataProblem{key: name, msg: "unknown key"})
			}
			return
		}
		out = append(out, p)
	}
	walk(ve)
	sort.Slice(out, func(i, j int) bool {
		if out[i].key != out[j].key {
			return out[i].key < out[j].key
		}
		return out[i].msg < out[j].msg
	})
	return slices.Compact(out)
}

// checkMetadata validates a chain entry's metadata against the schema its agent published.
func checkMetadata(schemaText string, md map[string]string) []metadataProblem {
	ms, err := compileMetadataSchema(schemaText)
	if err != nil {
		// An agent that publishes a broken schema cannot have its policy's settings
		// checked; that is the agent's bug, not the config's.
		return nil
	}
	return ms.validate(md)
}
