// Command coverage prints the statement coverage of a Go cover profile, per package and in
// total, leaving out generated protobuf code. Profiles made with -coverpkg list a block once per
// test binary; a block counts as covered when any of them ran it.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
)

type block struct {
	stmts   int
	covered bool
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: coverage PROFILE")
		os.Exit(2)
	}
	if err := report(os.Args[1], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// report writes the coverage of the profile at path to w.
func report(profile string, w io.Writer) error {
	f, err := os.Open(profile)
	if err != nil {
		return err
	}
	defer f.Close()
	blocks := map[string]*block{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "mode:") {
			continue
		}
		// name.go:l.c,l.c stmts count
		fields := strings.Fields(line)
		if len(fields) != 3 {
			continue
		}
		file, _, _ := strings.Cut(fields[0], ":")
		if strings.HasSuffix(file, ".pb.go") {
			continue
		}
		stmts, _ := strconv.Atoi(fields[1])
		count, _ := strconv.Atoi(fields[2])
		b := blocks[fields[0]]
		if b == nil {
			b = &block{stmts: stmts}
			blocks[fields[0]] = b
		}
		b.covered = b.covered || count > 0
	}
	type tally struct{ total, covered int }
	pkgs := map[string]*tally{}
	var all tally
	for key, b := range blocks {
		file, _, _ := strings.Cut(key, ":")
		p := pkgs[path.Dir(file)]
		if p == nil {
			p = &tally{}
			pkgs[path.Dir(file)] = p
		}
		p.total += b.stmts
		all.total += b.stmts
		if b.covered {
			p.covered += b.stmts
			all.covered += b.stmts
		}
	}
	names := make([]string, 0, len(pkgs))
	for n := range pkgs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		p := pkgs[n]
		fmt.Fprintf(w, "%-70s %6.1f%%  (%d/%d)\n", n, pct(p.covered, p.total), p.covered, p.total)
	}
	fmt.Fprintf(w, "total statement coverage: %.1f%% (%d/%d statements)\n", pct(all.covered, all.total), all.covered, all.total)
	return sc.Err()
}

func pct(a, b int) float64 {
	if b == 0 {
		return 100
	}
	return 100 * float64(a) / float64(b)
}
