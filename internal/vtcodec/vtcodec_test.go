package vtcodec

import (
	"errors"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/encoding"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

func TestRegisteredAsProto(t *testing.T) {
	if _, ok := encoding.GetCodecV2("proto").(*Codec); !ok {
		t.Fatalf("the proto codec is %T, want *vtcodec.Codec", encoding.GetCodecV2("proto"))
	}
	// A second New keeps the standard codec as the fallback, not itself.
	if c := New(); c.fallback == nil || c.fallback.Name() != "proto" {
		t.Fatalf("fallback = %v", c.fallback)
	} else if _, self := c.fallback.(*Codec); self {
		t.Fatal("fallback is the vt codec itself")
	}
	if New().Name() != "proto" {
		t.Fatal("name is not proto")
	}
}

// roundTrip marshals in with the codec, checks that the bytes decode with the standard
// library to the same message, and unmarshals them with the codec into out.
func roundTrip(t *testing.T, in, out proto.Message) {
	t.Helper()
	c := New()
	data, err := c.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	raw := data.Materialize()
	std := in.ProtoReflect().New().Interface()
	if err := proto.Unmarshal(raw, std); err != nil {
		t.Fatalf("standard unmarshal of the codec's bytes: %v", err)
	}
	if !proto.Equal(in, std) {
		t.Fatalf("codec bytes decode to %v, want %v", std, in)
	}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(raw)}, out); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(in, out) {
		t.Fatalf("round trip gave %v, want %v", out, in)
	}
	data.Free()
}

func TestRoundTrips(t *testing.T) {
	req := &agentv1.PolicyRequest{
		RequestId: "r-1",
		Policies:  []*agentv1.Policy{{Name: "apiKeyAuth", Metadata: map[string]string{"header_name": "X-API-Key"}}},
		Context:   &agentv1.RequestContext{Headers: map[string]string{"a": "1", "b": "2"}, Path: "/x", Body: []byte("body")},
		CallId:    7,
	}
	roundTrip(t, req, &agentv1.PolicyRequest{})
	// Large enough for a pooled buffer.
	big := &agentv1.PolicyRequest{Context: &agentv1.RequestContext{Body: []byte(strings.Repeat("x", 64<<10))}}
	roundTrip(t, big, &agentv1.PolicyRequest{})
	// go-control-plane's Strict marshalling, unmarshalled by the fallback.
	resp := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{
		Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{{
			Header: &corev3.HeaderValue{Key: "x-user-id", RawValue: []byte("u1")},
		}}}},
	}}}
	roundTrip(t, resp, &extprocv3.ProcessingResponse{})
	bigResp := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{
		Response: &extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: []byte(strings.Repeat("y", 64<<10))}}},
	}}}
	roundTrip(t, bigResp, &extprocv3.ProcessingResponse{})
	// No generated code at all: both directions by the fallback.
	roundTrip(t, &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, &healthpb.HealthCheckResponse{})
}

func TestUnmarshalError(t *testing.T) {
	c := New()
	garbage := mem.BufferSlice{mem.SliceBuffer([]byte{0x0a, 0xff})} // field 1, length past the end
	err := c.Unmarshal(garbage, &agentv1.PolicyRequest{})
	if err == nil || !strings.Contains(err.Error(), "unmarshal *agentv1.PolicyRequest") {
		t.Fatalf("err = %v, want an unmarshal error naming the type", err)
	}
}

// failing implements both marshaller shapes and always fails.
type failing struct{ size int }

func (f failing) SizeVT() int                              { return f.size }
func (failing) MarshalToSizedBufferVT([]byte) (int, error) { return 0, errFail }

type failingStrict struct{ size int }

func (f failingStrict) SizeVT() int                                    { return f.size }
func (failingStrict) MarshalToSizedBufferVTStrict([]byte) (int, error) { return 0, errFail }

var errFail = errors.New("boom")

func TestMarshalError(t *testing.T) {
	c := New()
	for _, v := range []any{failing{8}, failing{64 << 10}, failingStrict{8}, failingStrict{64 << 10}} {
		if _, err := c.Marshal(v); !errors.Is(err, errFail) {
			t.Errorf("Marshal(%T %v): err = %v, want the marshaller's error", v, v, err)
		}
	}
}

func TestSetDecoder(t *testing.T) {
	defer SetDecoder(nil)
	var calls int
	SetDecoder(func(data []byte, v any) (bool, error) {
		m, ok := v.(*healthpb.HealthCheckRequest)
		if !ok {
			return false, nil
		}
		calls++
		if len(data) == 0 {
			return true, errFail
		}
		m.Service = string(data)
		return true, nil
	})
	c := New()
	var req healthpb.HealthCheckRequest
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte("svc"))}, &req); err != nil || req.Service != "svc" || calls != 1 {
		t.Fatalf("decoder not used: %v, %q, %d calls", err, req.Service, calls)
	}
	if err := c.Unmarshal(mem.BufferSlice{}, &req); !errors.Is(err, errFail) {
		t.Fatalf("decoder error not returned: %v", err)
	}
	// Types the decoder does not take go to the generated code or the standard codec.
	roundTrip(t, &agentv1.PolicyRequest{RequestId: "x"}, &agentv1.PolicyRequest{})
	roundTrip(t, &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, &healthpb.HealthCheckResponse{})
}
