// Package cond compiles and evaluates the CEL expressions of chain entries: `when` conditions
// (does the entry run for this request?) and `cache` keys (which requests share a result?).
//
// An expression reads the request through these variables, each type-checked when the
// expression is compiled, so that a misspelled name or a comparison of a string with a number
// is a config error and never a request's:
//
//	request.method    string              "GET"
//	request.path      string              ":path" as Envoy sent it, query included
//	request.url_path  string              the path without its query
//	request.host      string              ":authority"
//	request.scheme    string              ":scheme"
//	request.headers   map(string, string) lower-case names; repeated headers joined with ", "
//	request.query     map(string, string) the query's parameters (the first of a repeated one),
//	                                      parsed from request.path when the expression reads it
//	source.address    string              the client's address as the kernel sees it
//	route.name        string              the route the request took
//	state             map(string, string) state set by earlier entries of the chain
//
// and a condition (not a cache key) of a response chain's entry reads the upstream's response:
//
//	response.code     int                 the response's status
//	response.headers  map(string, string) lower-case names, as request.headers
//
// Only `state` depends on the chain: an expression that does not read it can be evaluated
// before the chain runs (ReadsState). Evaluation is bounded by a cost limit, so that no
// expression can stall a request; exceeding it is an evaluation error.
package cond

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"
	"github.com/google/cel-go/interpreter"
)

// CostLimit bounds the work of one evaluation in CEL's cost units (about one per operation,
// one per element a comprehension visits, the length of the strings a function scans). A
// condition over a few headers costs tens; the limit leaves room for a regular expression over
// every header of a large request and stops anything that would take more than tens of
// microseconds.
const CostLimit = 10000

// MaxExpressionLength bounds an expression's source.
const MaxExpressionLength = 4096

// Names of the variables an expression may read.
const (
	varMethod  = "request.method"
	varPath    = "request.path"
	varURLPath = "request.url_path"
	varHost    = "request.host"
	varScheme  = "request.scheme"
	varHeaders = "request.headers"
	varQuery   = "request.query"
	varSource  = "source.address"
	varRoute   = "route.name"
	varState   = "state"
	// Condition-only variables: the response, in the response phase.
	varRespCode    = "response.code"
	varRespHeaders = "response.headers"
)

// variables lists the variables for the message of an expression that names another.
var (
	variables     = []string{varMethod, varPath, varURLPath, varHost, varScheme, varHeaders, varQuery, varSource, varRoute, varState}
	condVariables = append(variables[:len(variables):len(variables)], varRespCode+" and "+varRespHeaders+" in a response chain")
)

// condEnv is env with the response, which only conditions read.
var condEnv = sync.OnceValues(func() (*cel.Env, error) {
	e, err := env()
	if err != nil {
		return nil, err
	}
	return e.Extend(
		cel.Variable(varRespCode, cel.IntType),
		cel.Variable(varRespHeaders, cel.MapType(cel.StringType, cel.StringType)),
	)
})

var env = sync.OnceValues(func() (*cel.Env, error) {
	str := cel.StringType
	strMap := cel.MapType(cel.StringType, cel.StringType)
	return cel.NewEnv(
		cel.Variable(varMethod, str),
		cel.Variable(varPath, str),
		cel.Variable(varURLPath, str),
		cel.Variable(varHost, str),
		cel.Variable(varScheme, str),
		cel.Variable(varHeaders, strMap),
		cel.Variable(varQuery, strMap),
		cel.Variable(varSource, str),
		cel.Variable(varRoute, str),
		cel.Variable(varState, strMap),
	)
})

// Expr is a compiled expression, safe for concurrent use.
type Expr struct {
	src           string
	prg           cel.Program
	readsState    bool
	readsResponse bool
}

// Source returns the expression as written.
func (e *Expr) Source() string { return e.src }

// ReadsState reports whether the expression reads `state`, which only the chain's run knows.
func (e *Expr) ReadsState() bool { return e.readsState }

// ReadsResponse reports whether a condition reads response.code or response.headers, which
// only a response chain has.
func (e *Expr) ReadsResponse() bool { return e.readsResponse }

// CompileCondition compiles a `when` condition, which must be of type bool.
func CompileCondition(src string) (*Expr, error) {
	return compile(condEnv, condVariables, src, func(t *cel.Type) error {
		if !t.IsExactType(cel.BoolType) {
			return fmt.Errorf("a condition must be a bool, got %s", t)
		}
		return nil
	})
}

// CompileKey compiles one part of a cache key: a string, an int, a uint, a bool or a double.
func CompileKey(src string) (*Expr, error) {
	return compile(env, variables, src, func(t *cel.Type) error {
		for _, ok := range []*cel.Type{cel.StringType, cel.IntType, cel.UintType, cel.BoolType, cel.DoubleType, cel.DynType} {
			if t.IsExactType(ok) {
				return nil
			}
		}
		return fmt.Errorf("a cache key must be a string, a number or a bool, got %s", t)
	})
}

func compile(envOf func() (*cel.Env, error), vars []string, src string, check func(*cel.Type) error) (*Expr, error) {
	if strings.TrimSpace(src) == "" {
		return nil, errors.New("empty expression")
	}
	if len(src) > MaxExpressionLength {
		return nil, fmt.Errorf("expression of %d bytes is longer than %d", len(src), MaxExpressionLength)
	}
	e, err := envOf()
	if err != nil {
		return nil, err
	}
	ast, iss := e.Compile(src)
	if iss.Err() != nil {
		msg := strings.TrimSpace(iss.Err().Error())
		if strings.Contains(msg, "undeclared reference") {
			msg += "\n(the variables are " + strings.Join(vars, ", ") + ")"
		}
		if strings.Contains(msg, "invalid argument to has() macro") {
			// has() takes a field selection, not an index: the form users write for a header
			// whose name has a dash is a membership test.
			msg += "\n(has() takes a field, as in has(request.query.format); for a map key write \"x-api-key\" in request.headers)"
		}
		return nil, errors.New(msg)
	}
	if err := check(ast.OutputType()); err != nil {
		return nil, err
	}
	prg, err := e.Program(ast, cel.CostLimit(CostLimit), cel.InterruptCheckFrequency(100), cel.EvalOptions(cel.OptOptimize))
	if err != nil {
		return nil, err
	}
	x := &Expr{src: src, prg: prg}
	for _, r := range ast.NativeRep().ReferenceMap() {
		switch r.Name {
		case varState:
			x.readsState = true
		case varRespCode, varRespHeaders:
			x.readsResponse = true
		}
	}
	return x, nil
}

// Input is what an expression reads. The kernel and the agent each fill one from the request
// they hold; maps may be nil (read as empty). A nil Query is parsed from Path the first time
// an expression reads request.query, and kept in the Input: an Input is one request's, never
// shared between goroutines.
type Input struct {
	Method, Path, Host, Scheme, SourceAddress, Route string
	Headers, Query, State                            map[string]string
	// ResponseCode and ResponseHeaders are the upstream's response, in the response phase.
	ResponseCode    int
	ResponseHeaders map[string]string
}

// input is an Input as a CEL activation, without copying it into a map.
type input struct{ in *Input }

var emptyMap = map[string]string{}

func orEmpty(m map[string]string) map[string]string {
	if m == nil {
		return emptyMap
	}
	return m
}

func (a input) ResolveName(name string) (any, bool) {
	in := a.in
	switch name {
	case varMethod:
		return types.String(in.Method), true
	case varPath:
		return types.String(in.Path), true
	case varURLPath:
		p := in.Path
		if i := strings.IndexByte(p, '?'); i >= 0 {
			p = p[:i]
		}
		return types.String(p), true
	case varHost:
		return types.String(in.Host), true
	case varScheme:
		return types.String(in.Scheme), true
	case varHeaders:
		return orEmpty(in.Headers), true
	case varQuery:
		if in.Query == nil {
			in.Query = parseQuery(in.Path)
		}
		return orEmpty(in.Query), true
	case varSource:
		return types.String(in.SourceAddress), true
	case varRoute:
		return types.String(in.Route), true
	case varState:
		return orEmpty(in.State), true
	case varRespCode:
		return types.Int(in.ResponseCode), true
	case varRespHeaders:
		return orEmpty(in.ResponseHeaders), true
	}
	return nil, false
}

func (input) Parent() interpreter.Activation { return nil }

// parseQuery returns the query parameters of a path, the first value of each; nil when it has
// none. A malformed pair is left out, as url.ParseQuery leaves it.
func parseQuery(path string) map[string]string {
	_, q, ok := strings.Cut(path, "?")
	if !ok || q == "" {
		return nil
	}
	vals, _ := url.ParseQuery(q)
	if len(vals) == 0 {
		return nil
	}
	m := make(map[string]string, len(vals))
	for k, v := range vals {
		m[k] = v[0]
	}
	return m
}

func (e *Expr) eval(in *Input) (ref.Val, error) {
	out, _, err := e.prg.Eval(input{in})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", e.src, err)
	}
	return out, nil
}

// Condition evaluates a condition compiled by CompileCondition.
func (e *Expr) Condition(in *Input) (bool, error) {
	out, err := e.eval(in)
	if err != nil {
		return false, err
	}
	b, ok := out.(types.Bool)
	if !ok {
		return false, fmt.Errorf("%s: evaluated to %s, not a bool", e.src, out.Type().TypeName())
	}
	return bool(b), nil
}

// AppendKey evaluates a key part compiled by CompileKey and appends it to dst, prefixed by its
// length so that the parts of a key never run into each other.
func (e *Expr) AppendKey(dst []byte, in *Input) ([]byte, error) {
	out, err := e.eval(in)
	if err != nil {
		return dst, err
	}
	var s string
	switch v := out.(type) {
	case types.String:
		s = string(v)
	case types.Int:
		s = strconv.FormatInt(int64(v), 10)
	case types.Uint:
		s = strconv.FormatUint(uint64(v), 10) + "u"
	case types.Bool:
		s = strconv.FormatBool(bool(v))
	case types.Double:
		s = strconv.FormatFloat(float64(v), 'g', -1, 64)
	default:
		return dst, fmt.Errorf("%s: evaluated to %s, which cannot be a cache key", e.src, out.Type().TypeName())
	}
	dst = strconv.AppendInt(dst, int64(len(s)), 10)
	dst = append(dst, ':')
	return append(dst, s...), nil
}
