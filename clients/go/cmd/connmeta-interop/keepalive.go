package main

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/connmeta/connmeta/clients/go/connmeta"
)

// pingCounter counts the HTTP/2 PING frames (not PING acks) the client
// writes, by following the frame headers of the outgoing byte stream. It
// lets the keepalive case prove that pings were really sent, so that "the
// connection survived" is not true merely because nothing pinged.
type pingCounter struct {
	pings atomic.Int64

	mu       sync.Mutex
	preface  int    // bytes of the client connection preface still to skip
	header   []byte // partial frame header
	skipBody int    // payload bytes of the current frame still to skip
}

const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

func (p *pingCounter) observe(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(b) > 0 {
		switch {
		case p.preface > 0:
			n := min(p.preface, len(b))
			p.preface -= n
			b = b[n:]
		case p.skipBody > 0:
			n := min(p.skipBody, len(b))
			p.skipBody -= n
			b = b[n:]
		default:
			n := min(9-len(p.header), len(b))
			p.header = append(p.header, b[:n]...)
			b = b[n:]
			if len(p.header) == 9 {
				length := int(p.header[0])<<16 | int(p.header[1])<<8 | int(p.header[2])
				const typePing, flagAck = 0x6, 0x1
				if p.header[3] == typePing && p.header[4]&flagAck == 0 {
					p.pings.Add(1)
				}
				p.skipBody = length
				p.header = p.header[:0]
			}
		}
	}
}

type countingConn struct {
	net.Conn
	counter *pingCounter
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.counter.observe(b[:n])
	return n, err
}

// countingDialer dials target's network (unix for unix: targets, else tcp)
// and counts the pings written on the connection.
func countingDialer(target string, counter *pingCounter) grpc.DialOption {
	network := "tcp"
	if strings.HasPrefix(target, "unix:") {
		network = "unix"
	}
	return grpc.WithContextDialer(func(ctx context.Context, address string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, network, address)
		if err != nil {
			return nil, err
		}
		counter.reset()
		return countingConn{conn, counter}, nil
	})
}

// reset starts following a new connection's byte stream.
func (p *pingCounter) reset() {
	p.mu.Lock()
	p.preface = len(http2Preface)
	p.header, p.skipBody = nil, 0
	p.mu.Unlock()
}

// countingTLS counts the pings inside TLS: it wraps the connection the TLS
// handshake returns, where HTTP/2 frames are still plaintext.
type countingTLS struct {
	credentials.TransportCredentials
	counter *pingCounter
}

func (c countingTLS) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return nil, nil, err
	}
	c.counter.reset()
	return countingConn{conn, c.counter}, info, nil
}

func (c countingTLS) Clone() credentials.TransportCredentials {
	return countingTLS{c.TransportCredentials.Clone(), c.counter}
}

// countingOptions are the Dial options of a connection to e.target whose
// outgoing pings counter counts, over mutual TLS when the case runs with it.
func countingOptions(e *env, counter *pingCounter) ([]connmeta.Option, error) {
	if e.tls == nil || strings.HasPrefix(e.target, "unix:") {
		return []connmeta.Option{connmeta.WithDialOptions(countingDialer(e.target, counter))}, nil
	}
	cfg, err := e.tls.Config()
	if err != nil {
		return nil, err
	}
	// Given last, these credentials replace the plaintext ones Dial sets.
	return []connmeta.Option{connmeta.WithDialOptions(
		grpc.WithTransportCredentials(countingTLS{credentials.NewTLS(cfg), counter}))}, nil
}
