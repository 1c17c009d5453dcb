package headers

import (
	"strings"
	"testing"
)

func TestValidName(t *testing.T) {
	for _, ok := range []string{"x-api-key", ":path", "X-Frame-Options", "a!#$%&'*+-.^_`|~1"} {
		if err := ValidName(ok); err != nil {
			t.Errorf("ValidName(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", ":", "a b", "a:b", "x\r", "x\n", "x\x00", "é", "a/b", "(x)"} {
		if err := ValidName(bad); err == nil {
			t.Errorf("ValidName(%q) accepted", bad)
		}
	}
}

func TestValidValue(t *testing.T) {
	for _, ok := range []string{"", "nosniff", "a b\tc", "ünïcode", "\x80\xff", " ~!"} {
		if err := ValidValue(ok); err != nil {
			t.Errorf("ValidValue(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"a\rb", "a\nb", "a\x00b", "\r\n", "a\x01b", "\x1f", "a\x7fb", "\x0b", "\x1b[31m"} {
		if err := ValidValue(bad); err != ErrInvalidValue {
			t.Errorf("ValidValue(%q) = %v", bad, err)
		}
	}
}

func TestMutationRules(t *testing.T) {
	set := map[string]bool{
		"host": false, ":authority": false, ":method": false, ":scheme": false,
		"x-envoy-original-path": false, ":protocol": false,
		":path": true, ":status": true, "x-user-id": true, "content-type": true,
	}
	for name, want := range set {
		if got := SetAllowed(name); got != want {
			t.Errorf("SetAllowed(%q) = %v, want %v", name, got, want)
		}
	}
	remove := map[string]bool{
		"host": false, ":path": false, ":status": false, "x-envoy-foo": false,
		"x-api-key": true, "content-length": true,
	}
	for name, want := range remove {
		if got := RemoveAllowed(name); got != want {
			t.Errorf("RemoveAllowed(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestValidStatus(t *testing.T) {
	for v, want := range map[string]bool{"200": true, "404": true, "999": true, "199": false, "100": false, "20": false, "2000": false, "abc": false, "": false, "2a0": false} {
		if got := ValidStatus(v); got != want {
			t.Errorf("ValidStatus(%q) = %v, want %v", v, got, want)
		}
	}
}

func FuzzHeaderChecks(f *testing.F) {
	f.Add("x-api-key", "value")
	f.Add(":status", "200")
	f.Add("x-envoy-\r", "a\nb")
	f.Fuzz(func(t *testing.T, name, value string) {
		nameOK := ValidName(name) == nil
		valueOK := ValidValue(value) == nil
		for i := 0; i < len(value); i++ {
			if c := value[i]; (c < ' ' && c != '\t' || c == 0x7f) && valueOK {
				t.Fatalf("value %q accepted with a control byte", value)
			}
		}
		if !valueOK && !strings.ContainsFunc(value, func(r rune) bool { return r < ' ' && r != '\t' || r == 0x7f }) {
			t.Fatalf("value %q refused without a control byte", value)
		}
		if nameOK && name != "" && name[0] != ':' {
			for i := 0; i < len(name); i++ {
				if name[i] <= ' ' || name[i] >= 0x7f || name[i] == ':' {
					t.Fatalf("name %q accepted with byte 0x%02x", name, name[i])
				}
			}
		}
		_ = SetAllowed(name)
		_ = RemoveAllowed(name)
		if ValidStatus(value) && (len(value) != 3 || value < "200") {
			t.Fatalf("status %q accepted", value)
		}
	})
}

func TestSameName(t *testing.T) {
	f := func(a, b string, want bool) {
		t.Helper()
		if got := SameName(a, b); got != want {
			t.Errorf("SameName(%q, %q) = %v, want %v", a, b, got, want)
		}
	}
	f("x-user-id", "x-user-id", true)
	f("x_user_id", "x-user-id", true)
	f("X-User_Id", "x_user-id", true)
	f("x-user-id", "x-user-idx", false)
	f("x.user.id", "x-user-id", false)
	f("", "", true)
	f("x-user-ie", "x-user-id", false)
}
