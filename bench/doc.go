// Package bench holds benchmarks of whole policy chains as users configure them: the agent's
// executor running each route chain of the example configuration, with real policies and
// real settings. The hot-path pieces of the kernel and the agent have their own benchmarks
// next to their code (kernel/bench_test.go, agent/bench_test.go); make bench runs them all.
//
// Compare two runs with benchstat:
//
//	go test -run '^$' -bench . -benchmem -count 10 ./bench/ > old.txt
//	(change something)
//	go test -run '^$' -bench . -benchmem -count 10 ./bench/ > new.txt
//	go run golang.org/x/perf/cmd/benchstat@latest old.txt new.txt
package bench
