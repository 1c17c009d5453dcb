package kernel

import (
	"errors"
	"fmt"
	"math"
	"unicode/utf8"
	"unsafe"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
	"github.com/policy-engine/policy-engine/internal/vtcodec"
)

// The kernel decodes Envoy's ProcessingRequest by hand: the reflection-based decoder was the
// largest single cost of the kernel's CPU profile, and the fields Envoy sends are few. Every
// string and byte field points into one private copy of the message (one allocation instead
// of two per header). Anything this decoder does not know exactly as proto.Unmarshal does it
// (an unknown field, a repeated singular message, invalid UTF-8, a nested struct value) makes
// it hand the whole message to proto.Unmarshal instead, so the result is always what the
// standard decoder gives; a fuzz test holds it to that.
//
// Each message's loop over its fields is written out, although they look alike: the same
// loops over a shared "next field" helper took 50% more time (a call and a returned struct per
// field, about forty fields per request_headers message).

func init() {
	vtcodec.SetDecoder(func(data []byte, v any) (bool, error) {
		switch m := v.(type) {
		case *extprocv3.ProcessingRequest:
			return true, decodeProcessingRequest(data, m)
		case *agentv1.PolicyResponse:
			// The same for the agent's replies: their strings point into one private copy.
			// The kernel keeps them no longer than the stream (state values), so the copy
			// does not outlive its use.
			return true, m.UnmarshalVTUnsafe(append([]byte(nil), data...))
		case *agentv1.PolicyResponseBatch:
			return true, m.UnmarshalVTUnsafe(append([]byte(nil), data...))
		}
		return false, nil
	})
}

// errFallback makes the fast decoder give up on a message.
var errFallback = errors.New("fall back to proto.Unmarshal")

// decodeProcessingRequest decodes data into m, which must be empty.
func decodeProcessingRequest(data []byte, m *extprocv3.ProcessingRequest) error {
	if err := fastProcessingRequest(data, m); err != nil {
		proto.Reset(m)
		return proto.Unmarshal(data, m)
	}
	return nil
}

// decoder walks one message; buf is the private copy that strings and bytes point into.
type decoder struct {
	buf []byte
}

func fastProcessingRequest(data []byte, m *extprocv3.ProcessingRequest) error {
	d := decoder{buf: append([]byte(nil), data...)}
	b := d.buf
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errFallback
		}
		b = b[n:]
		switch {
		case num >= 2 && num <= 7 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 || m.Request != nil {
				return errFallback
			}
			b = b[n:]
			if err := d.request(num, v, m); err != nil {
				return err
			}
		case num == 8 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 || m.MetadataContext != nil {
				return errFallback
			}
			b = b[n:]
			m.MetadataContext = &corev3.Metadata{}
			if len(v) > 0 {
				if err := proto.Unmarshal(v, m.MetadataContext); err != nil {
					return errFallback
				}
			}
		case num == 9 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return errFallback
			}
			b = b[n:]
			if err := d.attribute(v, m); err != nil {
				return err
			}
		case num == 10 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errFallback
			}
			b = b[n:]
			m.ObservabilityMode = v != 0
		case num == 11 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 || m.ProtocolConfig != nil {
				return errFallback
			}
			b = b[n:]
			pc, err := protocolConfig(v)
			if err != nil {
				return err
			}
			m.ProtocolConfig = pc
		default:
			return errFallback
		}
	}
	return nil
}

func (d *decoder) request(num protowire.Number, v []byte, m *extprocv3.ProcessingRequest) error {
	switch num {
	case 2, 3:
		h, err := d.httpHeaders(v)
		if err != nil {
			return err
		}
		if num == 2 {
			m.Request = &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: h}
		} else {
			m.Request = &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: h}
		}
	case 4, 5:
		body, err := d.httpBody(v)
		if err != nil {
			return err
		}
		if num == 4 {
			m.Request = &extprocv3.ProcessingRequest_RequestBody{RequestBody: body}
		} else {
			m.Request = &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: body}
		}
	default: // 6, 7
		t, err := d.httpTrailers(v)
		if err != nil {
			return err
		}
		if num == 6 {
			m.Request = &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: t}
		} else {
			m.Request = &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: t}
		}
	}
	return nil
}

// httpHeaders decodes HttpHeaders{headers = 1 (HeaderMap), end_of_stream = 3}.
func (d *decoder) httpHeaders(b []byte) (*extprocv3.HttpHeaders, error) {
	h := &extprocv3.HttpHeaders{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, errFallback
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 || h.Headers != nil {
				return nil, errFallback
			}
			b = b[n:]
			hm, err := d.headerMap(v)
			if err != nil {
				return nil, err
			}
			h.Headers = hm
		case num == 3 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return nil, errFallback
			}
			b = b[n:]
			h.EndOfStream = v != 0
		default:
			return nil, errFallback
		}
	}
	return h, nil
}

// headerMap decodes HeaderMap{repeated HeaderValue headers = 1}, allocating the values in
// one slice.
func (d *decoder) headerMap(b []byte) (*corev3.HeaderMap, error) {
	count := 0
	for rest := b; len(rest) > 0; count++ {
		num, typ, n := protowire.ConsumeTag(rest)
		if n < 0 || num != 1 || typ != protowire.BytesType {
			return nil, errFallback
		}
		_, m := protowire.ConsumeBytes(rest[n:])
		if m < 0 {
			return nil, errFallback
		}
		rest = rest[n+m:]
	}
	values := make([]corev3.HeaderValue, count)
	hm := &corev3.HeaderMap{Headers: make([]*corev3.HeaderValue, count)}
	for i := range count {
		_, _, n := protowire.ConsumeTag(b)
		v, m := protowire.ConsumeBytes(b[n:])
		b = b[n+m:]
		if err := d.headerValue(v, &values[i]); err != nil {
			return nil, err
		}
		hm.Headers[i] = &values[i]
	}
	return hm, nil
}

// headerValue decodes HeaderValue{key = 1, value = 2, raw_value = 3}.
func (d *decoder) headerValue(b []byte, hv *corev3.HeaderValue) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || typ != protowire.BytesType || num < 1 || num > 3 {
			return errFallback
		}
		v, m := protowire.ConsumeBytes(b[n:])
		if m < 0 {
			return errFallback
		}
		b = b[n+m:]
		switch num {
		case 1:
			s, err := d.str(v)
			if err != nil {
				return err
			}
			hv.Key = s
		case 2:
			s, err := d.str(v)
			if err != nil {
				return err
			}
			hv.Value = s
		case 3:
			hv.RawValue = d.bytes(v)
		}
	}
	return nil
}

// httpBody decodes HttpBody{body = 1, end_of_stream = 2}.
func (d *decoder) httpBody(b []byte) (*extprocv3.HttpBody, error) {
	body := &extprocv3.HttpBody{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, errFallback
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, errFallback
			}
			b = b[n:]
			body.Body = d.bytes(v)
		case num == 2 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return nil, errFallback
			}
			b = b[n:]
			body.EndOfStream = v != 0
		default:
			return nil, errFallback
		}
	}
	return body, nil
}

// httpTrailers decodes HttpTrailers{trailers = 1 (HeaderMap)}.
func (d *decoder) httpTrailers(b []byte) (*extprocv3.HttpTrailers, error) {
	t := &extprocv3.HttpTrailers{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || num != 1 || typ != protowire.BytesType || t.Trailers != nil {
			return nil, errFallback
		}
		v, m := protowire.ConsumeBytes(b[n:])
		if m < 0 {
			return nil, errFallback
		}
		b = b[n+m:]
		hm, err := d.headerMap(v)
		if err != nil {
			return nil, err
		}
		t.Trailers = hm
	}
	return t, nil
}

// attribute decodes one entry of map<string, Struct> attributes = 9. A later entry with the
// same key replaces an earlier one, as in proto.Unmarshal.
func (d *decoder) attribute(b []byte, m *extprocv3.ProcessingRequest) error {
	var (
		key    string
		val    *structpb.Struct
		gotVal bool
	)
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || typ != protowire.BytesType || (num != 1 && num != 2) {
			return errFallback
		}
		v, l := protowire.ConsumeBytes(b[n:])
		if l < 0 {
			return errFallback
		}
		b = b[n+l:]
		if num == 1 {
			s, err := d.str(v)
			if err != nil {
				return err
			}
			key = s
			continue
		}
		if gotVal {
			return errFallback // a repeated value would be merged
		}
		gotVal = true
		st, err := d.structValue(v)
		if err != nil {
			return err
		}
		val = st
	}
	if val == nil {
		val = &structpb.Struct{}
	}
	if m.Attributes == nil {
		m.Attributes = make(map[string]*structpb.Struct, 1)
	}
	m.Attributes[key] = val
	return nil
}

// structValue decodes a Struct whose values are strings, numbers or booleans.
func (d *decoder) structValue(b []byte) (*structpb.Struct, error) {
	st := &structpb.Struct{Fields: map[string]*structpb.Value{}}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || num != 1 || typ != protowire.BytesType {
			return nil, errFallback
		}
		entry, l := protowire.ConsumeBytes(b[n:])
		if l < 0 {
			return nil, errFallback
		}
		b = b[n+l:]
		var (
			key string
			val *structpb.Value
		)
		for len(entry) > 0 {
			num, typ, n := protowire.ConsumeTag(entry)
			if n < 0 || typ != protowire.BytesType || (num != 1 && num != 2) {
				return nil, errFallback
			}
			v, l := protowire.ConsumeBytes(entry[n:])
			if l < 0 {
				return nil, errFallback
			}
			entry = entry[n+l:]
			if num == 1 {
				s, err := d.str(v)
				if err != nil {
					return nil, err
				}
				key = s
				continue
			}
			if val != nil {
				return nil, errFallback
			}
			pv, err := d.scalarValue(v)
			if err != nil {
				return nil, err
			}
			val = pv
		}
		if val == nil {
			val = &structpb.Value{}
		}
		st.Fields[key] = val
	}
	return st, nil
}

// scalarValue decodes a Value holding a string (3), a number (2) or a bool (4).
func (d *decoder) scalarValue(b []byte) (*structpb.Value, error) {
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 {
		return nil, errFallback
	}
	b = b[n:]
	var (
		v *structpb.Value
		l int
	)
	switch {
	case num == 3 && typ == protowire.BytesType:
		var raw []byte
		raw, l = protowire.ConsumeBytes(b)
		if l < 0 {
			return nil, errFallback
		}
		s, err := d.str(raw)
		if err != nil {
			return nil, err
		}
		v = structpb.NewStringValue(s)
	case num == 2 && typ == protowire.Fixed64Type:
		var bits uint64
		bits, l = protowire.ConsumeFixed64(b)
		if l < 0 {
			return nil, errFallback
		}
		v = structpb.NewNumberValue(math.Float64frombits(bits))
	case num == 4 && typ == protowire.VarintType:
		var x uint64
		x, l = protowire.ConsumeVarint(b)
		if l < 0 {
			return nil, errFallback
		}
		v = structpb.NewBoolValue(x != 0)
	default:
		return nil, errFallback
	}
	if len(b) != l {
		return nil, errFallback // a second kind would replace the first
	}
	return v, nil
}

// protocolConfig decodes ProtocolConfiguration{request_body_mode = 1, response_body_mode = 2,
// send_body_without_waiting_for_header_response = 3}.
func protocolConfig(b []byte) (*extprocv3.ProtocolConfiguration, error) {
	pc := &extprocv3.ProtocolConfiguration{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || typ != protowire.VarintType || num < 1 || num > 3 {
			return nil, errFallback
		}
		v, l := protowire.ConsumeVarint(b[n:])
		if l < 0 {
			return nil, errFallback
		}
		b = b[n+l:]
		switch num {
		case 1:
			pc.RequestBodyMode = filterv3.ProcessingMode_BodySendMode(int32(v))
		case 2:
			pc.ResponseBodyMode = filterv3.ProcessingMode_BodySendMode(int32(v))
		case 3:
			pc.SendBodyWithoutWaitingForHeaderResponse = v != 0
		}
	}
	return pc, nil
}

// str returns v as a string sharing the decoder's private buffer; proto3 strings must be
// valid UTF-8, and an invalid one is left to proto.Unmarshal to report.
func (d *decoder) str(v []byte) (string, error) {
	if len(v) == 0 {
		return "", nil
	}
	if !utf8.Valid(v) {
		return "", errFallback
	}
	return unsafe.String(unsafe.SliceData(v), len(v)), nil
}

// bytes returns v, which already lies in the decoder's private buffer. proto.Unmarshal gives
// an empty non-nil slice for an empty field; so does this.
func (d *decoder) bytes(v []byte) []byte {
	if len(v) == 0 {
		return []byte{}
	}
	return v[:len(v):len(v)]
}

// errNotUTF8 is an agent reply with a string that is not UTF-8: proto3 forbids it, and the
// generated decoder, unlike proto.Unmarshal, does not check it.
var errNotUTF8 = fmt.Errorf("%w: a string of the reply is not UTF-8", errInvalidAgentResponse)

// checkReplyUTF8 returns errNotUTF8 when a string field of resp is not valid UTF-8.
func checkReplyUTF8(resp *agentv1.PolicyResponse) error {
	ok := utf8.ValidString(resp.GetRequestId()) && utf8.ValidString(resp.GetMessage()) &&
		utf8.ValidString(resp.GetStatus().GetPolicyName()) && validMap(resp.GetMetadata())
	for _, in := range resp.GetInstructions() {
		if !ok {
			break
		}
		switch p := in.GetPayload().(type) {
		case *agentv1.Instruction_Header:
			ok = utf8.ValidString(p.Header.GetKey()) && utf8.ValidString(p.Header.GetValue())
		case *agentv1.Instruction_State:
			ok = utf8.ValidString(p.State.GetKey()) && utf8.ValidString(p.State.GetValue())
		case *agentv1.Instruction_ImmediateResponse:
			ok = utf8.ValidString(p.ImmediateResponse.GetDetails()) && validMap(p.ImmediateResponse.GetHeaders())
		}
	}
	if !ok {
		return errNotUTF8
	}
	return nil
}

func validMap(m map[string]string) bool {
	for k, v := range m {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return false
		}
	}
	return true
}
