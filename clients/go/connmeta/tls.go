package connmeta

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLSFiles names the PEM files of a mutual-TLS connection, as `connmeta
// certs init --dir DIR` writes them: DIR/ca.pem and DIR/<role>.pem,
// DIR/<role>.key (role reader, writer, router or reporter).
type TLSFiles struct {
	// CA verifies the sidecar's certificate (required).
	CA string
	// Cert and Key are the client certificate and its key; both or
	// neither (then no client certificate is sent).
	Cert, Key string
	// ServerName is the name the sidecar's certificate must carry; empty
	// means the target's host (an IP address is matched against IP SANs).
	ServerName string
}

// Config builds the tls.Config these files describe: TLS 1.2 or newer, the
// CA as the only root, and the client certificate read from disk at every
// handshake (so a rotated one is picked up by the next connection). It
// fails now if a file is missing or malformed.
func (f TLSFiles) Config() (*tls.Config, error) {
	if f.CA == "" {
		return nil, errors.New("TLS needs a CA file (the sidecar's issuer)")
	}
	if (f.Cert == "") != (f.Key == "") {
		return nil, fmt.Errorf("TLS client certificate %q and key %q: give both or neither", f.Cert, f.Key)
	}
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("TLS CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("TLS CA %s: no PEM certificate in it", f.CA)
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    roots,
		ServerName: f.ServerName,
	}
	if f.Cert != "" {
		if _, err := f.clientCertificate(); err != nil {
			return nil, err
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return f.clientCertificate()
		}
	}
	return cfg, nil
}

func (f TLSFiles) clientCertificate() (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("TLS client certificate %s / key %s: %w", f.Cert, f.Key, err)
	}
	return &cert, nil
}
