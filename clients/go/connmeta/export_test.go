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
