// Package jsonedit edits a JSON document in one pass without decoding it: as the scan reaches
// each object member, a Visitor decides whether the member is kept, removed, renamed or has its
// value replaced.
//
// Bytes that no edit touches are copied as they are, so member order, whitespace, string
// escapes and number literals (12345678901234567890 stays exact) survive. A document that needs
// no edit is returned as the same slice, without a copy. The scan is iterative with an explicit
// stack capped at a maximum depth, so hostile nesting costs neither goroutine stack nor more than
// one linear pass, and the document is validated on the way with the grammar of RFC 8259 (the
// same documents that encoding/json.Valid accepts, up to the depth cap).
//
// The responseBodyTransform policy removes and renames fields with it; the auditLog policy
// redacts credentials with it.
package jsonedit

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Op is what happens to an object member.
type Op uint8

const (
	// Keep leaves the member as it is; its value is visited.
	Keep Op = iota
	// Remove deletes the member, with the comma that separates it from its neighbours.
	Remove
	// Rename replaces the member's key with Action.Raw, a quoted JSON string; its value is
	// visited.
	Rename
	// Replace replaces the member's value with Action.Raw, a JSON value; the old value is not
	// visited.
	Replace
)

// Action is a Visitor's decision about one object member.
type Action struct {
	Op  Op
	Raw []byte
}

// Visitor chooses the edits. S is the state the visitor keeps for a JSON value, for instance the
// set of configured paths that can still match below it.
type Visitor[S any] interface {
	// Member is called for each member of an object whose state is s, with the member's
	// decoded key, which is valid only during the call. It returns the action for the member
	// and the state of the member's value.
	Member(s S, key []byte) (Action, S)
	// Element returns the state of element i of an array whose state is s.
	Element(s S, i int) S
}

var (
	// ErrSyntax is returned, wrapped with the offset, for a document that is not JSON.
	ErrSyntax = errors.New("invalid JSON")
	// ErrTooDeep is returned for a document nested deeper than the cap.
	ErrTooDeep = errors.New("JSON nested too deeply")
)

// frame is one open object or array.
type frame[S any] struct {
	state S
	obj   bool
	// skip marks a value that an edit removes or replaces as a whole: it is scanned for
	// validity but neither visited nor edited inside.
	skip bool
	// emitted reports that the object has kept a member, so a later member's comma stays.
	emitted bool
	index   int
	// The current member's edit, applied when its value ends.
	pendingOp    Op
	pendingStart int
	pendingRaw   []byte
}

type editor[S any] struct {
	src    []byte
	out    []byte
	copied int // src[:copied] is already accounted for in out
	v      Visitor[S]
	keyBuf []byte
}

// edit replaces src[start:end] with raw. Edits come in increasing order of start.
func (e *editor[S]) edit(start, end int, raw []byte) {
	if e.out == nil {
		e.out = make([]byte, 0, len(e.src))
	}
	e.out = append(e.out, e.src[e.copied:start]...)
	e.out = append(e.out, raw...)
	e.copied = end
}

// Edit scans src, applies the visitor's edits and returns the edited document and whether any
// edit was made; unchanged, it returns src itself. root is the state of the top-level value.
// Nesting deeper than maxDepth objects and arrays is ErrTooDeep; a document that is not JSON is
// ErrSyntax.
func Edit[S any](src []byte, maxDepth int, root S, v Visitor[S]) ([]byte, bool, error) {
	e := &editor[S]{src: src, v: v}
	stack := make([]frame[S], 0, 16)
	cur, skip := root, false
	pos := 0
	var err error
	for {
		// A value starts at pos.
		pos = skipSpace(src, pos)
		if pos >= len(src) {
			return nil, false, syntaxError(pos, "unexpected end of input")
		}
		if c := src[pos]; c == '{' || c == '[' {
			if len(stack) >= maxDepth {
				return nil, false, fmt.Errorf("%w: more than %d levels", ErrTooDeep, maxDepth)
			}
			stack = append(stack, frame[S]{state: cur, obj: c == '{', skip: skip})
			pos = skipSpace(src, pos+1)
			if pos < len(src) && src[pos] == c+2 { // '{'+2 is '}', '['+2 is ']'
				pos++
				stack = stack[:len(stack)-1]
			} else {
				f := &stack[len(stack)-1]
				if f.obj {
					if pos, cur, skip, err = e.beginMember(f, pos, -1); err != nil {
						return nil, false, err
					}
				} else {
					cur, skip = e.element(f)
				}
				continue
			}
		} else if pos, err = scanScalar(src, pos); err != nil {
			return nil, false, err
		}
		// A value ended at pos: finish members and close containers until the next value.
		for {
			if len(stack) == 0 {
				if pos = skipSpace(src, pos); pos != len(src) {
					return nil, false, syntaxError(pos, "data after the top-level value")
				}
				if e.out == nil {
					return src, false, nil
				}
				return append(e.out, src[e.copied:]...), true, nil
			}
			f := &stack[len(stack)-1]
			if f.obj {
				e.endMember(f, pos)
			}
			pos = skipSpace(src, pos)
			if pos >= len(src) {
				return nil, false, syntaxError(pos, "unexpected end of input")
			}
			c := src[pos]
			if c == ',' {
				if f.obj {
					if pos, cur, skip, err = e.beginMember(f, skipSpace(src, pos+1), pos); err != nil {
						return nil, false, err
					}
				} else {
					f.index++
					cur, skip = e.element(f)
					pos++
				}
				break
			}
			if (f.obj && c == '}') || (!f.obj && c == ']') {
				pos++
				stack = stack[:len(stack)-1]
				continue
			}
			return nil, false, syntaxError(pos, "expected ',' or the end of the container")
		}
	}
}

// element returns the state of the array's current element.
func (e *editor[S]) element(f *frame[S]) (S, bool) {
	var zero S
	if f.skip {
		return zero, true
	}
	return e.v.Element(f.state, f.index), false
}

// beginMember scans a member's key and colon at pos (commaPos is the offset of the comma before
// it, or -1 for the first member), asks the visitor and records the member's edit. It returns
// the offset of the member's value and the value's state.
func (e *editor[S]) beginMember(f *frame[S], pos, commaPos int) (int, S, bool, error) {
	var zero S
	if pos >= len(e.src) || e.src[pos] != '"' {
		return 0, zero, false, syntaxError(pos, "expected an object key")
	}
	keyStart := pos
	keyEnd, escaped, err := scanString(e.src, pos)
	if err != nil {
		return 0, zero, false, err
	}
	pos = skipSpace(e.src, keyEnd)
	if pos >= len(e.src) || e.src[pos] != ':' {
		return 0, zero, false, syntaxError(pos, "expected ':' after an object key")
	}
	pos = skipSpace(e.src, pos+1)
	if f.skip {
		return pos, zero, true, nil
	}
	key := e.src[keyStart+1 : keyEnd-1]
	if escaped {
		var s string
		if err := json.Unmarshal(e.src[keyStart:keyEnd], &s); err != nil {
			return 0, zero, false, syntaxError(keyStart, "invalid object key")
		}
		e.keyBuf = append(e.keyBuf[:0], s...)
		key = e.keyBuf
	}
	act, child := e.v.Member(f.state, key)
	switch act.Op {
	case Remove:
		// From the comma before the member, if any; the first member kept later drops the
		// comma that follows it when nothing before it was kept.
		f.pendingOp, f.pendingStart = Remove, keyStart
		if commaPos >= 0 {
			f.pendingStart = commaPos
		}
		return pos, zero, true, nil
	case Keep, Rename, Replace:
		if commaPos >= 0 && !f.emitted {
			// Every member before this one was removed: its comma goes too.
			e.edit(commaPos, commaPos+1, nil)
		}
		f.emitted = true
		if act.Op == Rename {
			e.edit(keyStart, keyEnd, act.Raw)
		}
		if act.Op == Replace {
			f.pendingOp, f.pendingStart, f.pendingRaw = Replace, pos, act.Raw
			return pos, zero, true, nil
		}
		return pos, child, false, nil
	default:
		panic(fmt.Sprintf("BUG: jsonedit: unknown op %d", act.Op))
	}
}

// endMember applies the edit of the member whose value ended at end.
func (e *editor[S]) endMember(f *frame[S], end int) {
	switch f.pendingOp {
	case Remove:
		e.edit(f.pendingStart, end, nil)
	case Replace:
		e.edit(f.pendingStart, end, f.pendingRaw)
	}
	f.pendingOp, f.pendingRaw = Keep, nil
}

func syntaxError(pos int, msg string) error {
	return fmt.Errorf("%w at offset %d: %s", ErrSyntax, pos, msg)
}

func skipSpace(src []byte, pos int) int {
	for pos < len(src) {
		switch src[pos] {
		case ' ', '\t', '\n', '\r':
			pos++
		default:
			return pos
		}
	}
	return pos
}

// scanScalar scans a string, number or literal at pos and returns the offset after it.
func scanScalar(src []byte, pos int) (int, error) {
	switch c := src[pos]; {
	case c == '"':
		end, _, err := scanString(src, pos)
		return end, err
	case c == 't':
		return scanLiteral(src, pos, "true")
	case c == 'f':
		return scanLiteral(src, pos, "false")
	case c == 'n':
		return scanLiteral(src, pos, "null")
	case c == '-' || (c >= '0' && c <= '9'):
		return scanNumber(src, pos)
	}
	return 0, syntaxError(pos, "expected a value")
}

func scanLiteral(src []byte, pos int, lit string) (int, error) {
	if len(src)-pos < len(lit) || string(src[pos:pos+len(lit)]) != lit {
		return 0, syntaxError(pos, "invalid literal")
	}
	return pos + len(lit), nil
}

// scanString scans the string whose opening quote is at pos. It returns the offset after the
// closing quote and whether the string holds escapes.
func scanString(src []byte, pos int) (int, bool, error) {
	escaped := false
	for i := pos + 1; i < len(src); i++ {
		for i < len(src) && !stringSpecial[src[i]] {
			i++
		}
		if i == len(src) {
			break
		}
		switch c := src[i]; {
		case c == '"':
			return i + 1, escaped, nil
		case c == '\\':
			escaped = true
			i++
			if i >= len(src) {
				return 0, false, syntaxError(i, "unterminated string")
			}
			switch src[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if len(src)-i <= 4 || !isHex(src[i+1]) || !isHex(src[i+2]) || !isHex(src[i+3]) || !isHex(src[i+4]) {
					return 0, false, syntaxError(i, `invalid \u escape`)
				}
				i += 4
			default:
				return 0, false, syntaxError(i, "invalid escape")
			}
		case c < 0x20:
			return 0, false, syntaxError(i, "control character in a string")
		}
	}
	return 0, false, syntaxError(len(src), "unterminated string")
}

// stringSpecial marks the bytes that end a run of plain string bytes: the quote, the
// backslash and control characters.
var stringSpecial = func() (t [256]bool) {
	for c := 0; c < 0x20; c++ {
		t[c] = true
	}
	t['"'], t['\\'] = true, true
	return t
}()

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

// scanNumber scans a number by the grammar of RFC 8259: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func scanNumber(src []byte, pos int) (int, error) {
	i := pos
	if src[i] == '-' {
		i++
	}
	switch {
	case i < len(src) && src[i] == '0':
		i++
	case i < len(src) && src[i] >= '1' && src[i] <= '9':
		i = digits(src, i)
	default:
		return 0, syntaxError(i, "invalid number")
	}
	if i < len(src) && src[i] == '.' {
		j := digits(src, i+1)
		if j == i+1 {
			return 0, syntaxError(j, "invalid number: no digits after '.'")
		}
		i = j
	}
	if i < len(src) && (src[i] == 'e' || src[i] == 'E') {
		i++
		if i < len(src) && (src[i] == '+' || src[i] == '-') {
			i++
		}
		j := digits(src, i)
		if j == i {
			return 0, syntaxError(j, "invalid number: no digits in the exponent")
		}
		i = j
	}
	return i, nil
}

func digits(src []byte, i int) int {
	for i < len(src) && src[i] >= '0' && src[i] <= '9' {
		i++
	}
	return i
}

// IsJSONContentType reports whether a content-type header names JSON: application/json or
// application/*+json, with or without parameters.
func IsJSONContentType(contentType string) bool {
	mt, _, _ := strings.Cut(contentType, ";")
	mt = strings.ToLower(strings.TrimSpace(mt))
	if mt == "application/json" {
		return true
	}
	sub, ok := strings.CutPrefix(mt, "application/")
	return ok && strings.HasSuffix(sub, "+json") && len(sub) > len("+json") && !strings.ContainsAny(sub, "/ \t")
}
