package bodytransform

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/adler32"
	"io"
	"strings"
	"sync"
)

// What the content-type says about a body.
type bodyKind uint8

const (
	// kindOther is a declared type that is not JSON: the body passes unchanged.
	kindOther bodyKind = iota
	// kindJSON is a declared JSON type: the body must be edited or refused.
	kindJSON
	// kindUnknown is a missing content-type: the body is edited or refused when it looks
	// like JSON, and passes otherwise.
	kindUnknown
)

// classify reads a content-type header. A media type is JSON when its name holds "json" in
// any case: application/json, text/json, anything +json, and variants such as
// application/x-ndjson, which are then edited if they parse as one JSON document and refused
// otherwise. A header that repeats (joined with commas) is JSON when any of its values is.
func classify(contentType string) bodyKind {
	kind := kindUnknown
	for rest := contentType; rest != ""; {
		var v string
		v, rest, _ = strings.Cut(rest, ",")
		mt, _, _ := strings.Cut(v, ";")
		mt = strings.TrimSpace(mt)
		if mt == "" {
			continue
		}
		if containsJSON(mt) {
			return kindJSON
		}
		kind = kindOther
	}
	return kind
}

// containsJSON reports whether s holds "json" in any case, without allocating.
func containsJSON(s string) bool {
	for i := 0; i+4 <= len(s); i++ {
		if s[i]|0x20 == 'j' && s[i+1]|0x20 == 's' && s[i+2]|0x20 == 'o' && s[i+3]|0x20 == 'n' {
			return true
		}
	}
	return false
}

// Prefixes that may come before the JSON text, kept as they are: a UTF-8 byte order mark, then
// one of the guards that servers put in front of JSON against cross-site script inclusion.
var (
	utf8BOM = []byte("\xef\xbb\xbf")
	guards  = [][]byte{[]byte(")]}',"), []byte(")]}'"), []byte("while(1);"), []byte("for(;;);")}
)

// splitPrefix returns the length of the prefix before the JSON text and whether it holds a
// guard.
func splitPrefix(b []byte) (n int, guarded bool) {
	if bytes.HasPrefix(b, utf8BOM) {
		n = len(utf8BOM)
	}
	for _, g := range guards {
		if bytes.HasPrefix(b[n:], g) {
			return n + len(g), true
		}
	}
	return n, false
}

// looksLikeJSON reports whether a body without a content-type is to be treated as JSON: the
// text after the prefix starts with an object or an array, or a guard announces JSON, or the
// body starts with a UTF-16 or UTF-32 byte order mark (text that a client may decode and
// parse, but that cannot be checked here).
func looksLikeJSON(b []byte) bool {
	if bytes.HasPrefix(b, []byte{0xfe, 0xff}) || bytes.HasPrefix(b, []byte{0xff, 0xfe}) || bytes.HasPrefix(b, []byte{0, 0, 0xfe, 0xff}) {
		return true
	}
	n, guarded := splitPrefix(b)
	if guarded {
		return true
	}
	for _, c := range b[n:] {
		switch c {
		case ' ', '\t', '\n', '\r':
			continue
		case '{', '[':
			return true
		}
		return false
	}
	return false
}

// maxCodings bounds the content codings of one body: each is decoded within max_body_bytes,
// and no server stacks more than a couple.
const maxCodings = 4

// Why a body cannot be decoded.
var (
	errUnsupportedCoding = errors.New("content coding that cannot be decoded")
	errCorrupt           = errors.New("compressed body that does not decode")
	errDecodedTooLarge   = errors.New("decoded body larger than max_body_bytes")
)

// decodeBody undoes the content codings of a body, the last one applied first. With no coding
// but identity it returns the body itself and decoded false. It never produces more than limit
// bytes: a body that expands further is errDecodedTooLarge, returned with its first limit bytes
// when the outermost coding overflowed (enough to tell whether the body is JSON). The output
// is written in *buf, which grows as needed; buf may be nil when contentEncoding is empty.
func decodeBody(contentEncoding string, body []byte, limit int, buf *[]byte) (out []byte, decoded bool, err error) {
	var codings [maxCodings]string
	n := 0
	for rest := contentEncoding; rest != ""; {
		var c string
		c, rest, _ = strings.Cut(rest, ",")
		if c = strings.TrimSpace(c); c == "" || strings.EqualFold(c, "identity") {
			continue
		}
		if n == len(codings) {
			return nil, true, fmt.Errorf("%w: more than %d codings", errUnsupportedCoding, maxCodings)
		}
		codings[n] = c
		n++
	}
	out = body
	for i := n - 1; i >= 0; i-- {
		src := out
		if i < n-1 {
			src = append([]byte(nil), out...) // out is in *buf, which the next coding writes
		}
		switch c := codings[i]; {
		case strings.EqualFold(c, "gzip"), strings.EqualFold(c, "x-gzip"):
			out, err = gunzip(src, limit, buf)
		case strings.EqualFold(c, "deflate"):
			out, err = inflate(src, limit, buf)
		default:
			return nil, true, fmt.Errorf("%w: %.40q", errUnsupportedCoding, c)
		}
		if err != nil {
			if i > 0 {
				out = nil // an inner coding's output is not the text
			}
			return out, true, err
		}
	}
	return out, n > 0, nil
}

// A gunzipper and an inflater are a decompressor and the reader of its input, pooled together:
// a decompressor keeps buffers worth tens of kilobytes, and resetting the input reader when
// one goes back to the pool drops its reference to the body.
type gunzipper struct {
	src bytes.Reader
	zr  *gzip.Reader
}

type inflater struct {
	src bytes.Reader
	fr  io.ReadCloser // a flate.Resetter
}

var gunzippers, inflaters sync.Pool

// gunzip decodes a gzip body: every member, and nothing after the last one.
func gunzip(src []byte, limit int, buf *[]byte) ([]byte, error) {
	g, _ := gunzippers.Get().(*gunzipper)
	if g == nil {
		g = &gunzipper{}
	}
	defer func() {
		g.src.Reset(nil)
		gunzippers.Put(g)
	}()
	g.src.Reset(src)
	var err error
	if g.zr == nil {
		g.zr, err = gzip.NewReader(&g.src)
	} else {
		err = g.zr.Reset(&g.src)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: gzip: %v", errCorrupt, err)
	}
	// The last 4 bytes are the size of the last member's text, mod 2^32: a hint for the
	// buffer, which readCapped caps at the limit whatever it says.
	hint := 4 * len(src)
	if len(src) >= 18 {
		hint = int(binary.LittleEndian.Uint32(src[len(src)-4:]))
	}
	return readCapped(g.zr, limit, buf, hint)
}

// inflate decodes a deflate body: a zlib stream (RFC 1950, what the HTTP coding means) or, as
// browsers also accept, a raw deflate stream (RFC 1951) when the first two bytes are not a zlib
// header. Nothing may follow the stream.
func inflate(src []byte, limit int, buf *[]byte) ([]byte, error) {
	zlib := len(src) >= 2 && src[0]&0x0f == 8 && src[0]>>4 <= 7 && (uint16(src[0])<<8|uint16(src[1]))%31 == 0
	if zlib && src[1]&0x20 != 0 {
		return nil, fmt.Errorf("%w: deflate: zlib preset dictionary", errCorrupt)
	}
	stream := src
	if zlib {
		stream = src[2:]
	}
	f, _ := inflaters.Get().(*inflater)
	if f == nil {
		f = &inflater{}
	}
	defer func() {
		f.src.Reset(nil)
		inflaters.Put(f)
	}()
	f.src.Reset(stream)
	if f.fr == nil {
		f.fr = flate.NewReader(&f.src)
	} else if err := f.fr.(flate.Resetter).Reset(&f.src, nil); err != nil {
		return nil, fmt.Errorf("%w: deflate: %v", errCorrupt, err)
	}
	out, err := readCapped(f.fr, limit, buf, 4*len(src))
	if err != nil {
		return out, err
	}
	// bytes.Reader is an io.ByteReader, so the decompressor read no further than the stream.
	rest := stream[len(stream)-f.src.Len():]
	if zlib {
		if len(rest) < 4 || binary.BigEndian.Uint32(rest) != adler32.Checksum(out) {
			return nil, fmt.Errorf("%w: deflate: zlib checksum", errCorrupt)
		}
		rest = rest[4:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: deflate: %d bytes after the stream", errCorrupt, len(rest))
	}
	return out, nil
}

// readCapped reads r to its end into *buf, but not more than limit bytes: past that it returns
// errDecodedTooLarge with the first limit bytes. hint is the expected size.
func readCapped(r io.Reader, limit int, buf *[]byte, hint int) ([]byte, error) {
	b := (*buf)[:0]
	// One byte more than the text, so that the read that meets the end has room.
	if want := min(max(hint, 0)+1, limit+1); cap(b) < want {
		b = make([]byte, 0, max(want, 512))
	}
	for {
		if len(b) == cap(b) {
			// Double, but never past limit+1: one byte more than the limit is enough to know.
			nb := make([]byte, len(b), min(max(2*cap(b), 512), limit+1))
			copy(nb, b)
			b = nb
		}
		n, err := r.Read(b[len(b):min(cap(b), limit+1)])
		b = b[:len(b)+n]
		if len(b) > limit {
			*buf = b
			return b[:limit], errDecodedTooLarge
		}
		if err == io.EOF {
			*buf = b
			return b, nil
		}
		if err != nil {
			*buf = b
			return nil, fmt.Errorf("%w: %v", errCorrupt, err)
		}
	}
}
