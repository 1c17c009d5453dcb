package kernel

import (
	"errors"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// decodeSamples are messages as Envoy sends them, one of each kind, plus a few it would not
// send that the decoder must hand to proto.Unmarshal.
func decodeSamples() []*extprocv3.ProcessingRequest {
	full := envoyRequest()
	full.MetadataContext = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"ns": {Fields: map[string]*structpb.Value{"k": structpb.NewStringValue("v")}}}}
	full.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_BUFFERED, ResponseBodyMode: filterv3.ProcessingMode_NONE, SendBodyWithoutWaitingForHeaderResponse: true}
	full.ObservabilityMode = true
	full.Attributes[attributesKey].Fields["request.size"] = structpb.NewNumberValue(42.5)
	full.Attributes[attributesKey].Fields["connection.mtls"] = structpb.NewBoolValue(true)
	nested := envoyRequest()
	nested.Attributes[attributesKey].Fields["list"] = structpb.NewListValue(&structpb.ListValue{Values: []*structpb.Value{structpb.NewStringValue("x")}})
	hm := &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: "grpc-status", RawValue: []byte("0")}, {Key: "old", Value: "value-field"}, {Key: "empty"}}}
	return []*extprocv3.ProcessingRequest{
		full,
		nested,
		envoyResponse(),
		{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte(`{"a":1}`), EndOfStream: true}}},
		{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: []byte{}}}},
		{Request: &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: &extprocv3.HttpTrailers{Trailers: hm}}},
		{Request: &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: &extprocv3.HttpTrailers{Trailers: hm}}},
		{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{}}, MetadataContext: &corev3.Metadata{}},
		{},
	}
}

// checkDecode decodes data with the kernel's decoder and with proto.Unmarshal, and fails if
// they disagree on the result or on whether it is an error.
func checkDecode(t *testing.T, data []byte) {
	t.Helper()
	want := &extprocv3.ProcessingRequest{}
	wantErr := proto.Unmarshal(data, want)
	got := &extprocv3.ProcessingRequest{}
	gotErr := decodeProcessingRequest(data, got)
	if (wantErr == nil) != (gotErr == nil) {
		t.Fatalf("decode %x: err = %v, proto.Unmarshal err = %v", data, gotErr, wantErr)
	}
	if wantErr == nil && !proto.Equal(got, want) {
		t.Fatalf("decode %x:\n got %v\nwant %v", data, got, want)
	}
}

func TestDecodeProcessingRequestMatchesProto(t *testing.T) {
	for _, m := range decodeSamples() {
		data, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		checkDecode(t, data)
		got := &extprocv3.ProcessingRequest{}
		if err := decodeProcessingRequest(data, got); err != nil || !proto.Equal(got, m) {
			t.Fatalf("round trip of %v: %v, %v", m, got, err)
		}
	}
	// Corner cases of the wire format that a real Envoy never sends.
	var b []byte
	b = protowire.AppendTag(b, 10, protowire.VarintType)
	b = protowire.AppendVarint(b, 1)
	b = protowire.AppendTag(b, 10, protowire.VarintType)
	b = protowire.AppendVarint(b, 0) // last one wins
	checkDecode(t, b)
	checkDecode(t, []byte{0x12, 0x02, 0x0a, 0x00, 0x12, 0x00})       // request_headers twice
	checkDecode(t, []byte{0x12, 0x04, 0x0a, 0x02, 0x0a, 0x01})       // truncated header value
	checkDecode(t, []byte{0x12, 0x05, 0x0a, 0x03, 0x0a, 0x01, 0xff}) // key not UTF-8
	checkDecode(t, []byte{0xf8, 0x07, 0x01})                         // unknown field 127
	checkDecode(t, []byte{0x4a, 0x00})                               // attribute entry with neither key nor value
}

func TestDecoderRegisteredWithCodec(t *testing.T) {
	data, err := proto.Marshal(envoyRequest())
	if err != nil {
		t.Fatal(err)
	}
	c := encoding.GetCodecV2("proto")
	got := &extprocv3.ProcessingRequest{}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(data)}, got); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, envoyRequest()) {
		t.Fatalf("codec decoded %v", got)
	}
	// The decoded message must not share the codec's buffer, which goes back to a pool.
	for i := range data {
		data[i] = 0
	}
	if !proto.Equal(got, envoyRequest()) {
		t.Fatal("decoded message changed when the input buffer was overwritten")
	}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{0x12, 0x05})}, &extprocv3.ProcessingRequest{}); err == nil {
		t.Fatal("truncated message decoded without error")
	}

	// Agent replies too, into memory of their own.
	reply := &agentv1.PolicyResponse{CallId: 9, Instructions: cannedRequest, Status: &agentv1.ResponseStatus{PolicyName: "apiKeyAuth"}}
	data, err = proto.Marshal(reply)
	if err != nil {
		t.Fatal(err)
	}
	gotReply := &agentv1.PolicyResponse{}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(data)}, gotReply); err != nil {
		t.Fatal(err)
	}
	for i := range data {
		data[i] = 0
	}
	if !proto.Equal(gotReply, reply) {
		t.Fatalf("agent reply decoded as %v, want %v", gotReply, reply)
	}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{0x12, 0x05})}, &agentv1.PolicyResponse{}); err == nil {
		t.Fatal("truncated agent reply decoded without error")
	}
}

// FuzzDecodeProcessingRequest holds the hand-written decoder to proto.Unmarshal's results on
// any input.
func FuzzDecodeProcessingRequest(f *testing.F) {
	for _, m := range decodeSamples() {
		data, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkDecode(t, data)
	})
}

// BenchmarkDecodeProcessingRequest compares the kernel's decoder with proto.Unmarshal on
// Envoy's request_headers message.
func BenchmarkDecodeProcessingRequest(b *testing.B) {
	data, err := proto.Marshal(envoyRequest())
	if err != nil {
		b.Fatal(err)
	}
	b.Run("kernel", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var m extprocv3.ProcessingRequest
			if err := decodeProcessingRequest(data, &m); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("proto", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var m extprocv3.ProcessingRequest
			if err := proto.Unmarshal(data, &m); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func TestCheckReplyUTF8(t *testing.T) {
	bad := "caf\xc3"
	valid := &agentv1.PolicyResponse{RequestId: "r", Message: "ok", Status: &agentv1.ResponseStatus{PolicyName: "p"},
		Metadata: map[string]string{"k": "v"}, Instructions: []*agentv1.Instruction{
			{Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: "x", Value: "café"}}},
			{Payload: &agentv1.Instruction_State{State: &agentv1.StateInstruction{Key: "s", Value: "v"}}},
			{Payload: &agentv1.Instruction_ImmediateResponse{ImmediateResponse: &agentv1.ImmediateResponse{Details: "d", Headers: map[string]string{"h": "v"}}}},
			{Payload: &agentv1.Instruction_Body{Body: &agentv1.BodyInstruction{Body: []byte(bad)}}}, // bytes may be anything
		}}
	if err := checkReplyUTF8(valid); err != nil {
		t.Fatalf("valid reply: %v", err)
	}
	for name, mutate := range map[string]func(*agentv1.PolicyResponse){
		"request id":  func(r *agentv1.PolicyResponse) { r.RequestId = bad },
		"message":     func(r *agentv1.PolicyResponse) { r.Message = bad },
		"policy name": func(r *agentv1.PolicyResponse) { r.Status.PolicyName = bad },
		"metadata":    func(r *agentv1.PolicyResponse) { r.Metadata = map[string]string{bad: "v"} },
		"header":      func(r *agentv1.PolicyResponse) { r.Instructions[0].GetHeader().Value = bad },
		"state":       func(r *agentv1.PolicyResponse) { r.Instructions[1].GetState().Key = bad },
		"details":     func(r *agentv1.PolicyResponse) { r.Instructions[2].GetImmediateResponse().Details = bad },
		"immediate header": func(r *agentv1.PolicyResponse) {
			r.Instructions[2].GetImmediateResponse().Headers = map[string]string{"h": bad}
		},
	} {
		r := proto.Clone(valid).(*agentv1.PolicyResponse)
		mutate(r)
		if err := checkReplyUTF8(r); !errors.Is(err, errInvalidAgentResponse) {
			t.Errorf("%s not UTF-8: err = %v", name, err)
		}
	}
}
