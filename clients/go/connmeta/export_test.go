package connmeta

// StartExampleServer gives the examples (package connmeta_test) the
// in-process fake when no real server is configured; test builds only.
func StartExampleServer() (target string, stop func()) {
	target, stop, err := startFake(&fakeServer{revision: 100})
	if err != nil {
		panic(err)
	}
	return target, stop
}

// StartExampleTLSServer gives the mTLS example a fake that requires a
// client certificate, and the files `connmeta certs init` would have
// written for it: the CA and the reader's certificate and key.
func StartExampleTLSServer(dir string) (target, ca, cert, key string, stop func()) {
	p, err := newTestPKI(dir, "ca")
	if err != nil {
		panic(err)
	}
	for _, leaf := range []struct{ name, uri string }{{"server", ""}, {"reader", "spiffe://connmeta.local/reader"}} {
		if err := p.issue(leaf.name, leaf.uri, leaf.name == "server"); err != nil {
			panic(err)
		}
	}
	target, stop, err = startTLSFake(&fakeServer{revision: 100}, p, nil)
	if err != nil {
		panic(err)
	}
	return target, p.path("ca.pem"), p.path("reader.pem"), p.path("reader.key"), stop
}
