package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"
)

// DecodeMetadata decodes a chain entry's metadata into the struct that dst points to.
//
// Metadata is a map of strings on the wire. A field is named by its json tag; strings are taken
// as they are, booleans and numbers are parsed, time.Duration accepts Go durations ("250ms"),
// and slices, maps and structs are JSON (the kernel sends YAML lists and maps as JSON). A key
// that names no field is an error, and so is a missing field tagged `required:"true"`. Every
// problem is reported at once, sorted by key.
func DecodeMetadata(metadata map[string]string, dst any) error {
	rv := reflect.ValueOf(dst)
	if rv.Kind() != reflect.Pointer || rv.Elem().Kind() != reflect.Struct {
		panic("BUG: policy.DecodeMetadata: dst must point to a struct")
	}
	sv := rv.Elem()
	st := sv.Type()
	fields := make(map[string]int, st.NumField())
	for i := 0; i < st.NumField(); i++ {
		if name := jsonName(st.Field(i)); name != "" {
			fields[name] = i
		}
	}
	keys := make([]string, 0, len(metadata))
	for k := range metadata {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var errs []error
	for _, k := range keys {
		i, ok := fields[k]
		if !ok {
			errs = append(errs, fmt.Errorf("metadata key %q: unknown key", k))
			continue
		}
		if err := setField(sv.Field(i), metadata[k]); err != nil {
			errs = append(errs, fmt.Errorf("metadata key %q: %w", k, err))
		}
	}
	for i := 0; i < st.NumField(); i++ {
		f := st.Field(i)
		name := jsonName(f)
		if name == "" || f.Tag.Get("required") != "true" {
			continue
		}
		if _, ok := metadata[name]; !ok {
			errs = append(errs, fmt.Errorf("metadata key %q: required", name))
		}
	}
	return errors.Join(errs...)
}

func jsonName(f reflect.StructField) string {
	if !f.IsExported() {
		return ""
	}
	tag := f.Tag.Get("json")
	if tag == "-" {
		return ""
	}
	name, _, _ := strings.Cut(tag, ",")
	if name == "" {
		return f.Name
	}
	return name
}

var durationType = reflect.TypeOf(time.Duration(0))

func setField(v reflect.Value, s string) error {
	if v.Kind() == reflect.Pointer && v.Type().Elem().Kind() != reflect.Struct {
		// *bool, *int, ...: "set or not" settings.
		p := reflect.New(v.Type().Elem())
		if err := setField(p.Elem(), s); err != nil {
			return err
		}
		v.Set(p)
		return nil
	}
	if v.Type() == durationType {
		d, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("want a duration such as \"250ms\", got %q", s)
		}
		v.SetInt(int64(d))
		return nil
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(s)
	case reflect.Bool:
		b, err := strconv.ParseBool(s)
		if err != nil {
			return fmt.Errorf("want true or false, got %q", s)
		}
		v.SetBool(b)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n, err := strconv.ParseInt(strings.TrimSpace(s), 10, v.Type().Bits())
		if err != nil {
			return fmt.Errorf("want an integer, got %q", s)
		}
		v.SetInt(n)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		n, err := strconv.ParseUint(strings.TrimSpace(s), 10, v.Type().Bits())
		if err != nil {
			return fmt.Errorf("want a non-negative integer, got %q", s)
		}
		v.SetUint(n)
	case reflect.Float32, reflect.Float64:
		n, err := strconv.ParseFloat(strings.TrimSpace(s), v.Type().Bits())
		if err != nil {
			return fmt.Errorf("want a number, got %q", s)
		}
		v.SetFloat(n)
	default:
		p := reflect.New(v.Type())
		if err := decodeStrictJSON([]byte(s), p.Interface()); err != nil {
			return err
		}
		v.Set(p.Elem())
	}
	return nil
}

// decodeStrictJSON decodes one JSON value, rejecting unknown object keys and trailing data.
func decodeStrictJSON(data []byte, dst any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return fmt.Errorf("invalid JSON: %w", err)
	}
	if dec.More() {
		return errors.New("invalid JSON: trailing data")
	}
	return nil
}
