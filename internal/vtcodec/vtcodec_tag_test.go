//go:build vtprotobuf

package vtcodec

import (
	"testing"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// With the vtprotobuf tag (as make builds), go-control-plane's ext_proc replies have generated
// marshalling code, which the codec must take instead of reflection.
func TestExtProcRepliesUseGeneratedCode(t *testing.T) {
	var v any = &extprocv3.ProcessingResponse{}
	if _, ok := v.(vtStrictMarshaler); !ok {
		t.Fatal("ProcessingResponse has no MarshalToSizedBufferVTStrict: built without -tags vtprotobuf?")
	}
}
