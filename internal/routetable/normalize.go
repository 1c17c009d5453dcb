package routetable

// A path is matched against route prefixes in the one spelling that Envoy (normalize_path,
// merge_slashes, path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT) and the usual
// upstream servers read it as, so that no other spelling of a protected path falls to a less
// specific route:
//
//   - the query string and fragment are cut off ('?', '#');
//   - a %-escape of an unreserved character (ALPHA, DIGIT, '-', '.', '_', '~') is decoded, once,
//     as RFC 3986 §6.2.2.2 and Envoy do: "%61dmin" is "admin", "%2e%2e" is "..";
//   - %2F and %5C are decoded to a separator, as UNESCAPE_AND_REDIRECT would before Envoy
//     routes the redirected request, and '\' is a separator too, as it is to Envoy's URL
//     canonicaliser and to Windows servers;
//   - ';' ends a segment: path parameters ("/admin;jsessionid=1", "/..;/admin") are dropped,
//     as servlet containers do before they route;
//   - empty segments are merged ("//"), "." segments removed and ".." removes the segment
//     before it, never going above the root (RFC 3986 §5.2.4);
//   - every other escape is kept (its hex digits lowercased), so "%252F" stays within its
//     segment, as Envoy decodes once.
//
// Matching is then case-insensitive (see Table.ByPath).

// stackPath is the longest path normalised without allocating.
const stackPath = 256

// pathClass marks the bytes that canonical looks at: 1 a byte that a normal path has no
// use for ('%', '\', ';', an uppercase letter), 2 a separator, 3 the end of the path ('?', '#').
var pathClass = func() (t [256]uint8) {
	for _, c := range "%\\;ABCDEFGHIJKLMNOPQRSTUVWXYZ" {
		t[c] = 1
	}
	t['/'] = 2
	t['?'], t['#'] = 3, 3
	return t
}()

// scan returns the length of path without its query string and fragment, and whether that
// part, which starts with '/', is its own normalised form with no uppercase letter, so that it
// can be matched as it is: no '%', '\', ';', uppercase letter, empty segment (but a trailing
// '/') or dot segment.
func scan(path string) (end int, canonical bool) {
	canonical = true
	seg := 1 // start of the current segment
	i := 1
	for ; i < len(path); i++ {
		switch pathClass[path[i]] {
		case 0:
			continue
		case 1:
			canonical = false
			continue
		case 3:
			return i, canonical && !dotOrEmpty(path[seg:i], false)
		}
		if dotOrEmpty(path[seg:i], true) {
			canonical = false
		}
		seg = i + 1
	}
	return i, canonical && !dotOrEmpty(path[seg:], false)
}

// dotOrEmpty reports whether a segment is "." or "..", or empty when inner says it is not the
// last one.
func dotOrEmpty(seg string, inner bool) bool {
	switch len(seg) {
	case 0:
		return inner
	case 1:
		return seg[0] == '.'
	case 2:
		return seg[0] == '.' && seg[1] == '.'
	}
	return false
}

// canonical reports whether a path without query string, starting with '/', can be matched as
// it is (see scan).
func canonical(path string) bool {
	end, ok := scan(path)
	return ok && end == len(path)
}

// normalize writes the normalised form of path (cut at '?' and '#', starting with '/') into
// buf, which must be at least len(path) long, and returns its length. It keeps letters' case;
// the result never holds '\', ';', an empty segment but a trailing '/', or a dot segment.
func normalize(buf []byte, path string) int {
	// Decode: unreserved escapes, %2F and %5C, '\'. The result is never longer than path.
	n := 0
	for i := 0; i < len(path); i++ {
		c := path[i]
		if c == '%' && i+2 < len(path) && isHex(path[i+1]) && isHex(path[i+2]) {
			v := unhex(path[i+1])<<4 | unhex(path[i+2])
			switch {
			case unreserved(v):
				c = v
			case v == '/' || v == '\\':
				c = '/'
			default:
				buf[n], buf[n+1], buf[n+2] = '%', lowerASCII(path[i+1]), lowerASCII(path[i+2])
				n += 3
				i += 2
				continue
			}
			i += 2
		}
		if c == '\\' {
			c = '/'
		}
		buf[n] = c
		n++
	}
	// Segments, in place: the write position never passes the read position.
	w, r := 0, 0
	trailing := false
	for r < n {
		// buf[r] is '/' here: the decoded path starts with one and each segment ends at one.
		start := r + 1
		end := start
		for end < n && buf[end] != '/' {
			end++
		}
		seg := start
		for seg < end && buf[seg] != ';' {
			seg++
		}
		r = end
		switch l := seg - start; {
		case l == 0, l == 1 && buf[start] == '.':
			trailing = true
		case l == 2 && buf[start] == '.' && buf[start+1] == '.':
			for w > 0 {
				w--
				if buf[w] == '/' {
					break
				}
			}
			trailing = true
		default:
			buf[w] = '/'
			w += 1 + copy(buf[w+1:], buf[start:seg])
			trailing = false
		}
	}
	if trailing || w == 0 {
		buf[w] = '/'
		w++
	}
	return w
}

// lowerInto writes the ASCII-lowercase form of src into dst, of the same length.
func lowerInto(dst, src []byte) {
	for i, c := range src {
		dst[i] = lowerASCII(c)
	}
}

func lowerASCII(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + ('a' - 'A')
	}
	return c
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= '0' && c <= '9':
		return c - '0'
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// unreserved reports whether c is an RFC 3986 unreserved character.
func unreserved(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}
