// Package vtcodec replaces gRPC's "proto" codec with one that uses the code vtprotobuf
// generates (SizeVT, MarshalToSizedBufferVT, UnmarshalVT) where a message has it, and the
// standard reflection-based codec elsewhere. The agent API's messages and the ext_proc replies
// have such code; marshalling them without reflection is what this package buys. Importing it
// registers the codec for the whole process.
package vtcodec

import (
	"fmt"
	"sync/atomic"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"

	// The standard codec registers itself first; this package replaces it and keeps it as
	// the fallback.
	_ "google.golang.org/grpc/encoding/proto"
)

// Name is the codec's name: gRPC's default content subtype.
const Name = "proto"

type vtMarshaler interface {
	SizeVT() int
	MarshalToSizedBufferVT(dAtA []byte) (int, error)
}

// vtStrictMarshaler is what go-control-plane generates: the same, named Strict.
type vtStrictMarshaler interface {
	SizeVT() int
	MarshalToSizedBufferVTStrict(dAtA []byte) (int, error)
}

type vtUnmarshaler interface {
	UnmarshalVT(dAtA []byte) error
}

// Codec marshals with generated code when it can.
type Codec struct {
	fallback encoding.CodecV2
}

func init() {
	encoding.RegisterCodecV2(New())
}

// New returns the codec, falling back to the codec registered as "proto" before it.
func New() *Codec {
	fb := encoding.GetCodecV2(Name)
	if c, ok := fb.(*Codec); ok {
		fb = c.fallback
	}
	return &Codec{fallback: fb}
}

// Name returns "proto".
func (*Codec) Name() string { return Name }

// Marshal encodes v into a buffer from gRPC's pool when it is large enough to be pooled.
func (c *Codec) Marshal(v any) (mem.BufferSlice, error) {
	var (
		size int
		fill func([]byte) (int, error)
	)
	switch m := v.(type) {
	case vtMarshaler:
		size, fill = m.SizeVT(), m.MarshalToSizedBufferVT
	case vtStrictMarshaler:
		size, fill = m.SizeVT(), m.MarshalToSizedBufferVTStrict
	default:
		return c.fallback.Marshal(v)
	}
	if mem.IsBelowBufferPoolingThreshold(size) {
		buf := make([]byte, size)
		if _, err := fill(buf); err != nil {
			return nil, fmt.Errorf("marshal %T: %w", v, err)
		}
		return mem.BufferSlice{mem.SliceBuffer(buf)}, nil
	}
	pool := mem.DefaultBufferPool()
	buf := pool.Get(size)
	if _, err := fill(*buf); err != nil {
		pool.Put(buf)
		return nil, fmt.Errorf("marshal %T: %w", v, err)
	}
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, nil
}

// Decoder decodes the message types it knows, reporting ok; it must copy whatever it keeps
// of data.
type Decoder func(data []byte, v any) (ok bool, err error)

var decoder atomic.Pointer[Decoder]

// SetDecoder makes d the first decoder tried for every message: for types that have no
// generated code, such as the ext_proc requests the kernel receives. nil removes it.
func SetDecoder(d Decoder) {
	if d == nil {
		decoder.Store(nil)
		return
	}
	decoder.Store(&d)
}

// Unmarshal decodes data into v. The generated code copies what it keeps, so the buffer is
// returned to the pool at once.
func (c *Codec) Unmarshal(data mem.BufferSlice, v any) error {
	d := decoder.Load()
	m, ok := v.(vtUnmarshaler)
	if !ok && d == nil {
		return c.fallback.Unmarshal(data, v)
	}
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	if d != nil {
		handled, err := (*d)(buf.ReadOnlyData(), v)
		if handled {
			if err != nil {
				return fmt.Errorf("unmarshal %T: %w", v, err)
			}
			return nil
		}
	}
	if !ok {
		return c.fallback.Unmarshal(mem.BufferSlice{buf}, v)
	}
	if err := m.UnmarshalVT(buf.ReadOnlyData()); err != nil {
		return fmt.Errorf("unmarshal %T: %w", v, err)
	}
	return nil
}

var _ encoding.CodecV2 = (*Codec)(nil)
