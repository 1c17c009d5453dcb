// Command ghzdata writes what loadtest/ghz/run.sh gives ghz: the ext_proc protoset
// (-protoset FILE) and one HTTP request of the load test's traffic as ghz data (-data FILE).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/policy-engine/policy-engine/loadtest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ghzdata:", err)
		os.Exit(1)
	}
}

func run() error {
	protoset := flag.String("protoset", "", "write the ext_proc FileDescriptorSet here")
	data := flag.String("data", "", "write the request's messages as ghz JSON data here")
	flag.Parse()
	if *protoset == "" && *data == "" {
		return errors.New("nothing to do: give -protoset, -data or both")
	}
	if *protoset != "" {
		f, err := os.Create(*protoset)
		if err != nil {
			return err
		}
		if err := errors.Join(loadtest.WriteProtoset(f), f.Close()); err != nil {
			return err
		}
	}
	if *data != "" {
		f, err := os.Create(*data)
		if err != nil {
			return err
		}
		if err := errors.Join(loadtest.WriteGHZData(f, loadtest.DefaultTraffic(loadtest.RouteName, loadtest.APIKey)), f.Close()); err != nil {
			return err
		}
	}
	return nil
}
