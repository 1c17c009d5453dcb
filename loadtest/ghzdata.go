package loadtest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

// WriteGHZData writes the messages of one HTTP request of tr, as ghz's --data-file takes them
// for a bidirectional stream: a JSON array, request headers then response headers.
func WriteGHZData(w io.Writer, tr *Traffic) error {
	ex := newExchanger(tr)
	var out []json.RawMessage
	for _, m := range []*extprocv3.ProcessingRequest{ex.requestMsg(), ex.respMsg} {
		b, err := protojson.MarshalOptions{UseProtoNames: false}.Marshal(m)
		if err != nil {
			return fmt.Errorf("encode ghz data: %w", err)
		}
		out = append(out, b)
	}
	data, err := json.Marshal(out)
	if err != nil {
		return fmt.Errorf("encode ghz data: %w", err)
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, data, "", "  "); err != nil {
		return fmt.Errorf("indent ghz data: %w", err)
	}
	pretty.WriteByte('\n')
	_, err = w.Write(pretty.Bytes())
	return err
}

// WriteProtoset writes the descriptors of the ext_proc service and everything it imports as
// a FileDescriptorSet, which ghz reads with --protoset: the kernel has no reflection service.
func WriteProtoset(w io.Writer) error {
	set := &descriptorpb.FileDescriptorSet{}
	seen := map[string]bool{}
	var add func(fd protoreflect.FileDescriptor)
	add = func(fd protoreflect.FileDescriptor) {
		if seen[fd.Path()] {
			return
		}
		seen[fd.Path()] = true
		imports := fd.Imports()
		for i := 0; i < imports.Len(); i++ {
			add(imports.Get(i).FileDescriptor)
		}
		set.File = append(set.File, protodesc.ToFileDescriptorProto(fd))
	}
	add(extprocv3.File_envoy_service_ext_proc_v3_external_processor_proto)
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(set)
	if err != nil {
		return fmt.Errorf("encode protoset: %w", err)
	}
	_, err = w.Write(data)
	return err
}
