// Command connmeta-interop runs the named interoperability cases of
// tests/interop/cases.md against a real connmeta server. Each case first
// acts as the proxy (ReportService) to create the state it needs, then as a
// consumer through the connmeta client package.
//
//	connmeta-interop --target 127.0.0.1:50051 --case get_not_found
//	connmeta-interop --target 127.0.0.1:50051 --tls-ca certs/ca.pem \
//	    --tls-cert certs/writer.pem --tls-key certs/writer.key --case health
//	connmeta-interop --list
//
// It exits 0 when the case passed, 1 with a message saying what differed
// when it failed, and 2 on a usage error.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/connmeta/connmeta/clients/go/connmeta"
)

// env is what every case gets.
type env struct {
	target     string
	unixTarget string
	keepalive  time.Duration // how long the keepalive case holds its idle watch
	// dial is what every connection of a case is dialed with: mutual TLS
	// for TCP targets when --tls-ca is given (Unix sockets ignore it).
	dial     []connmeta.Option
	tls      *connmeta.TLSFiles // the files behind dial, nil for plaintext
	rolesDir string             // case authz_roles: ca.pem and <role>.pem/.key
	client   *connmeta.Client
	proxy    *proxy
}

type interopCase struct {
	name, proves string
	run          func(ctx context.Context, e *env) error
}

func main() {
	target := flag.String("target", "", "server address: host:port or unix:///path (required)")
	unixTarget := flag.String("unix-target", "", "the same server's Unix socket, unix:///path (case unix_socket)")
	name := flag.String("case", "", "case to run (see --list)")
	list := flag.Bool("list", false, "print the cases, one per line: name<TAB>what it proves")
	keepaliveFor := flag.Duration("keepalive-duration", durationFromEnv("CONNMETA_INTEROP_KEEPALIVE_SECONDS", 60*time.Second),
		"how long case keepalive keeps an idle watch open (env CONNMETA_INTEROP_KEEPALIVE_SECONDS)")
	tlsCA := flag.String("tls-ca", "", "CA of the server's certificate (PEM): TCP connections use mutual TLS")
	tlsCert := flag.String("tls-cert", "", "client certificate (PEM) for mutual TLS")
	tlsKey := flag.String("tls-key", "", "client certificate's key (PEM) for mutual TLS")
	rolesDir := flag.String("roles-dir", "", "directory of `connmeta certs init` (ca.pem, <role>.pem/.key; case authz_roles)")
	flag.Parse()

	if *list {
		for _, c := range cases {
			fmt.Printf("%s\t%s\n", c.name, c.proves)
		}
		return
	}
	c := findCase(*name)
	if c == nil || *target == "" {
		fmt.Fprintf(os.Stderr, "usage: connmeta-interop --target ADDR --case NAME (cases: %s)\n", caseNames())
		os.Exit(2)
	}

	// Generous but finite: a hung server must fail the case, not CI.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second+*keepaliveFor)
	defer cancel()
	e := &env{target: *target, unixTarget: *unixTarget, keepalive: *keepaliveFor, rolesDir: *rolesDir}
	if *tlsCA != "" {
		e.tls = &connmeta.TLSFiles{CA: *tlsCA, Cert: *tlsCert, Key: *tlsKey}
		e.dial = append(e.dial, connmeta.WithTLSFiles(*e.tls))
	}
	err := runCase(ctx, c, e)
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL go %s: %v\n", c.name, err)
		os.Exit(1)
	}
	fmt.Printf("PASS go %s\n", c.name)
}

func runCase(ctx context.Context, c *interopCase, e *env) error {
	client, err := connmeta.Dial(e.target, e.dial...)
	if err != nil {
		return err
	}
	defer client.Close()
	e.client = client
	caseName = c.name
	e.proxy, err = newProxy(ctx, client)
	if err != nil {
		return err
	}
	defer e.proxy.close()
	return c.run(ctx, e)
}

func findCase(name string) *interopCase {
	for i := range cases {
		if cases[i].name == name {
			return &cases[i]
		}
	}
	return nil
}

func caseNames() string {
	names := make([]string, len(cases))
	for i, c := range cases {
		names[i] = c.name
	}
	return strings.Join(names, ", ")
}

func durationFromEnv(key string, def time.Duration) time.Duration {
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v + "s")
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s=%q: want a number of seconds\n", key, v)
		os.Exit(2)
	}
	return d
}
