package kernel

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
	"unsafe"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/headers"
)

// errInvalidAgentResponse marks an agent reply the kernel cannot act on (§3.5: deny with 500).
var errInvalidAgentResponse = errors.New("invalid agent response")

type opKind uint8

const (
	opSet opKind = iota
	opAppend
	opRemove
)

type headerOp struct {
	key, value string
	kind       opKind
}

// mutation is what a chain's instructions come to for one ext_proc reply.
type mutation struct {
	ops       []headerOp
	body      []byte
	bodySet   bool
	immediate *extprocv3.ImmediateResponse
	// dropped lists mutations that Envoy's rules would reject, so they were not sent.
	dropped []string
	// opsBuf holds the first operations, so that a typical reply allocates no slice.
	opsBuf [6]headerOp
}

// foldHeader records a header operation so that the reply holds at most one net operation per
// header: Envoy applies removals before sets, so "set x, then remove x" must reach it as a
// single removal.
func (m *mutation) foldHeader(op headerOp) {
	if op.kind == opAppend {
		for i := range m.ops {
			if m.ops[i].key == op.key && m.ops[i].kind == opRemove {
				m.ops[i] = headerOp{key: op.key, value: op.value, kind: opSet}
				return
			}
		}
		m.ops = append(m.ops, op)
		return
	}
	out := m.ops[:0]
	for _, o := range m.ops {
		if o.key != op.key {
			out = append(out, o)
		}
	}
	m.ops = append(out, op)
}

// buildMutation turns an agent's instructions into a mutation for the given phase. State
// instructions are handed to setState. It fails only on an instruction the kernel cannot
// understand, which makes the whole reply invalid.
func buildMutation(phase agentv1.PolicyPhase, ins []*agentv1.Instruction, setState func(k, v string)) (*mutation, error) {
	m := &mutation{}
	m.ops = m.opsBuf[:0]
	for _, in := range ins {
		switch in.GetType() {
		case agentv1.InstructionType_SET_HEADER, agentv1.InstructionType_REMOVE_HEADER:
			h := in.GetHeader()
			if h == nil {
				return nil, fmt.Errorf("%w: %s instruction without a header", errInvalidAgentResponse, in.GetType())
			}
			// The agent API's strings are UTF-8; a reply that breaks that is not valid
			// protobuf, whatever codec let it through.
			if !utf8.ValidString(h.GetKey()) || !utf8.ValidString(h.GetValue()) {
				return nil, fmt.Errorf("%w: header instruction that is not UTF-8", errInvalidAgentResponse)
			}
			key := strings.ToLower(h.GetKey())
			if in.GetType() == agentv1.InstructionType_REMOVE_HEADER {
				if headers.ValidName(key) != nil || !headers.RemoveAllowed(key) {
					m.dropped = append(m.dropped, "remove "+key)
					continue
				}
				m.foldHeader(headerOp{key: key, kind: opRemove})
				continue
			}
			if reason := setRejected(phase, key, h.GetValue()); reason != "" {
				m.dropped = append(m.dropped, "set "+key+": "+reason)
				continue
			}
			kind := opSet
			if h.GetAppend() {
				kind = opAppend
			}
			m.foldHeader(headerOp{key: key, value: h.GetValue(), kind: kind})
		case agentv1.InstructionType_SET_BODY:
			m.body = in.GetBody().GetBody()
			m.bodySet = true
		case agentv1.InstructionType_SET_STATE:
			st := in.GetState()
			if st == nil || st.GetKey() == "" {
				return nil, fmt.Errorf("%w: SET_STATE instruction without a key", errInvalidAgentResponse)
			}
			if !utf8.ValidString(st.GetKey()) || !utf8.ValidString(st.GetValue()) {
				return nil, fmt.Errorf("%w: SET_STATE instruction that is not UTF-8", errInvalidAgentResponse)
			}
			if setState != nil {
				setState(st.GetKey(), st.GetValue())
			}
		case agentv1.InstructionType_IMMEDIATE_RESPONSE:
			ir := in.GetImmediateResponse()
			if ir == nil {
				return nil, fmt.Errorf("%w: IMMEDIATE_RESPONSE instruction without a response", errInvalidAgentResponse)
			}
			imm, err := immediateFrom(ir, &m.dropped)
			if err != nil {
				return nil, err
			}
			m.immediate = imm
			return m, nil
		case agentv1.InstructionType_CONTINUE:
		default:
			return nil, fmt.Errorf("%w: unknown instruction type %d", errInvalidAgentResponse, in.GetType())
		}
	}
	return m, nil
}

// setRejected says why Envoy would refuse to set a header, or "" if it would not.
func setRejected(phase agentv1.PolicyPhase, key, value string) string {
	if err := headers.ValidName(key); err != nil {
		return "invalid name"
	}
	if err := headers.ValidValue(value); err != nil {
		return "invalid value"
	}
	if !headers.SetAllowed(key) {
		return "not allowed by Envoy's mutation rules"
	}
	switch key {
	case ":status":
		if phase != agentv1.PolicyPhase_RESPONSE || !headers.ValidStatus(value) {
			return "not a valid status"
		}
	case ":path":
		if phase != agentv1.PolicyPhase_REQUEST || value == "" || value[0] != '/' {
			return "not a valid path"
		}
	}
	return ""
}

// Shared read-only values of the append flag: replies are only read by the encoder, so every
// header option can point to one of these instead of allocating its own.
var (
	appendTrue  = wrapperspb.Bool(true)
	appendFalse = wrapperspb.Bool(false)
)

func appendFlag(b bool) *wrapperspb.BoolValue {
	if b {
		return appendTrue
	}
	return appendFalse
}

// headerOption is a header option and its header in one allocation.
type headerOption struct {
	opt corev3.HeaderValueOption
	hv  corev3.HeaderValue
}

// newHeaderOption returns the option that sets key to value. The raw value shares value's
// memory: the encoder only reads it.
func newHeaderOption(key, value string, appendValue bool) *corev3.HeaderValueOption {
	o := &headerOption{}
	o.hv.Key = key
	o.hv.RawValue = unsafe.Slice(unsafe.StringData(value), len(value))
	o.opt.Header = &o.hv
	o.opt.Append = appendFlag(appendValue)
	return &o.opt
}

// headerMutation is the ext_proc form of the mutation's header operations: values in raw_value
// only (Envoy reads nothing else) and the append BoolValue always set, because Envoy ignores
// append_action.
func (m *mutation) headerMutation() *extprocv3.HeaderMutation {
	if len(m.ops) == 0 {
		return nil
	}
	hm := &extprocv3.HeaderMutation{}
	m.fillHeaderMutation(hm)
	return hm
}

func (m *mutation) fillHeaderMutation(hm *extprocv3.HeaderMutation) {
	sets := 0
	for _, o := range m.ops {
		if o.kind != opRemove {
			sets++
		}
	}
	if sets > 0 {
		hm.SetHeaders = make([]*corev3.HeaderValueOption, 0, sets)
	}
	for _, o := range m.ops {
		if o.kind == opRemove {
			hm.RemoveHeaders = append(hm.RemoveHeaders, o.key)
			continue
		}
		hm.SetHeaders = append(hm.SetHeaders, newHeaderOption(o.key, o.value, o.kind == opAppend))
	}
}

// common builds the CommonResponse of a headers or body reply; nil when nothing changes.
// inBody says the reply answers a buffered body message, the only place where a body mutation
// can go; a body change also removes content-length, which would no longer match.
func (m *mutation) common(inBody bool) *extprocv3.CommonResponse {
	if m.bodySet && inBody {
		m.foldHeader(headerOp{key: "content-length", kind: opRemove})
	} else if m.bodySet {
		m.dropped = append(m.dropped, "body: no body was requested for this phase")
	}
	if len(m.ops) == 0 && !(m.bodySet && inBody) {
		return nil
	}
	// The response and its header mutation in one allocation.
	both := &struct {
		c  extprocv3.CommonResponse
		hm extprocv3.HeaderMutation
	}{}
	c := &both.c
	if len(m.ops) > 0 {
		m.fillHeaderMutation(&both.hm)
		c.HeaderMutation = &both.hm
	}
	if m.bodySet && inBody {
		c.BodyMutation = &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: m.body}}
	}
	return c
}

// immediateFrom converts an agent's immediate response, dropping headers that Envoy would
// refuse.
func immediateFrom(ir *agentv1.ImmediateResponse, dropped *[]string) (*extprocv3.ImmediateResponse, error) {
	code := ir.GetStatusCode()
	if code < 200 || code > 599 {
		return nil, fmt.Errorf("%w: immediate response status %d is not from 200 to 599", errInvalidAgentResponse, code)
	}
	out := &extprocv3.ImmediateResponse{
		Status:  &typev3.HttpStatus{Code: typev3.StatusCode(code)},
		Body:    ir.GetBody(),
		Details: sanitizeDetails(ir.GetDetails()),
	}
	if len(ir.GetHeaders()) > 0 {
		hm := &extprocv3.HeaderMutation{}
		for k, v := range ir.GetHeaders() {
			key := strings.ToLower(k)
			if reason := setRejected(agentv1.PolicyPhase_RESPONSE, key, v); reason != "" || strings.HasPrefix(key, ":") {
				*dropped = append(*dropped, "immediate response header "+key)
				continue
			}
			hm.SetHeaders = append(hm.SetHeaders, newHeaderOption(key, v, false))
		}
		out.Headers = hm
	}
	return out, nil
}

// sanitizeDetails keeps response code details to the characters Envoy allows there: no
// whitespace, which Envoy would replace.
func sanitizeDetails(s string) string {
	if s == "" {
		return ""
	}
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			b[i] = '_'
		}
	}
	if len(b) > 64 {
		b = b[:64]
	}
	return string(b)
}

// denial is the kernel's own immediate response: a JSON body written by an encoder.
func denial(status int, code, message string) *extprocv3.ImmediateResponse {
	return &extprocv3.ImmediateResponse{
		Status: &typev3.HttpStatus{Code: typev3.StatusCode(status)},
		Headers: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{{
			Header: &corev3.HeaderValue{Key: "content-type", RawValue: []byte("application/json")},
			Append: wrapperspb.Bool(false),
		}}},
		Body:    jsonError(code, message),
		Details: code,
	}
}
