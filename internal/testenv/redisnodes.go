package testenv

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// RedisNode is a redis-server (a cluster node, a master or replica watched by Sentinels, a
// Sentinel, a TLS-only server) that a test started on a free loopback port, without
// persistence. It is killed by its PID when the test ends.
type RedisNode struct {
	// Addr is its host:port (the TLS port of a TLS-only node).
	Addr string
	// Port is Addr's port.
	Port string
	// Dir is its working directory.
	Dir string
	// Username and Password, when Password is set, are sent with AUTH by Do.
	Username, Password string
	// TLS, when set, is how Do and the start-up check connect.
	TLS  *tls.Config
	t    testing.TB
	argv []string
	cmd  *exec.Cmd
}

// redisBinary finds a Redis program (redis-server, redis-cli) as StartRedis does: without it
// the test is skipped, except in CI.
func redisBinary(t testing.TB, name string) string {
	t.Helper()
	bin, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not installed; CI must have it (.ci/run installs it): %v", name, err)
		}
		t.Skipf("%s is not installed; install it (Debian: apt-get install redis-server) to run the Redis tests", name)
	}
	return bin
}

// newRedisNode reserves a port and a directory for a node.
func newRedisNode(t testing.TB) *RedisNode {
	t.Helper()
	addr := FreeAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	return &RedisNode{Addr: addr, Port: port, Dir: t.TempDir(), t: t}
}

// start runs redis-server with argv (after the program name) and waits until the node
// answers PING.
func (n *RedisNode) start(argv ...string) {
	n.t.Helper()
	n.argv = argv
	n.Start()
	n.t.Cleanup(n.Kill)
}

// Start starts the node again, with the same arguments and address, after Kill.
func (n *RedisNode) Start() {
	n.t.Helper()
	n.cmd = exec.Command(redisBinary(n.t, "redis-server"), n.argv...)
	log, err := os.OpenFile(filepath.Join(n.Dir, "redis.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		n.t.Fatal(err)
	}
	defer log.Close()
	n.cmd.Stdout, n.cmd.Stderr = log, log
	if err := n.cmd.Start(); err != nil {
		n.t.Fatalf("start redis-server: %v", err)
	}
	deadline := time.Now().Add(StartTimeout)
	for {
		// Any reply counts: a server whose default user is off answers NOAUTH.
		reply, err := n.Do("PING")
		var rerr RedisError
		if (err == nil && reply == "PONG") || errors.As(err, &rerr) {
			return
		}
		if time.Now().After(deadline) {
			n.Kill()
			b, _ := os.ReadFile(filepath.Join(n.Dir, "redis.log"))
			n.t.Fatalf("redis-server on %s did not answer PING within %v (last: %v, %v); its log:\n%s", n.Addr, StartTimeout, reply, err, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// PID returns the process id of the running node.
func (n *RedisNode) PID() int { return n.cmd.Process.Pid }

// Kill kills the node by its PID and reaps it; it does nothing when the node is not running.
func (n *RedisNode) Kill() {
	if n.cmd == nil {
		return
	}
	_ = n.cmd.Process.Kill()
	_ = n.cmd.Wait()
	n.cmd = nil
}

// baseArgs are the arguments every node gets: loopback only, no persistence.
func (n *RedisNode) baseArgs() []string {
	return []string{"--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", n.Dir, "--daemonize", "no"}
}

// StartRedisNode starts a redis-server on a free loopback port with extra arguments.
func StartRedisNode(t testing.TB, args ...string) *RedisNode {
	t.Helper()
	n := newRedisNode(t)
	n.start(append(append([]string{"--port", n.Port}, n.baseArgs()...), args...)...)
	return n
}

// Do sends one command on a new connection (AUTH first when Password is set) and returns the
// reply: a string for a simple or bulk string, an int64, nil, or []any for an array. A Redis
// error reply is returned as an error. It is bounded by two seconds.
func (n *RedisNode) Do(args ...string) (any, error) {
	d := net.Dialer{Timeout: time.Second}
	var c net.Conn
	var err error
	if n.TLS != nil {
		c, err = (&tls.Dialer{NetDialer: &d, Config: n.TLS}).Dial("tcp", n.Addr)
	} else {
		c, err = d.Dial("tcp", n.Addr)
	}
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	r := bufio.NewReader(c)
	if n.Password != "" {
		auth := []string{"AUTH", n.Password}
		if n.Username != "" {
			auth = []string{"AUTH", n.Username, n.Password}
		}
		if _, err := respDo(c, r, auth...); err != nil {
			return nil, fmt.Errorf("AUTH: %w", err)
		}
	}
	return respDo(c, r, args...)
}

// DoString is Do for a command whose reply is a string.
func (n *RedisNode) DoString(args ...string) (string, error) {
	v, err := n.Do(args...)
	if err != nil {
		return "", err
	}
	s, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("%s: reply %v is not a string", args[0], v)
	}
	return s, nil
}

// Info returns the field of INFO's section, or "".
func (n *RedisNode) Info(section, field string) string {
	s, err := n.DoString("INFO", section)
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(s, "\r\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return v
		}
	}
	return ""
}

func respDo(w io.Writer, r *bufio.Reader, args ...string) (any, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return nil, err
	}
	return respRead(r)
}

func respRead(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return nil, errors.New("empty reply line")
	}
	switch line[0] {
	case '+':
		return line[1:], nil
	case '-':
		return nil, RedisError(line[1:])
	case ':':
		return strconv.ParseInt(line[1:], 10, 64)
	case '$':
		size, err := strconv.Atoi(line[1:])
		if err != nil || size < 0 {
			return nil, err
		}
		buf := make([]byte, size+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:size]), nil
	case '*':
		count, err := strconv.Atoi(line[1:])
		if err != nil || count < 0 {
			return nil, err
		}
		out := make([]any, count)
		for i := range out {
			if out[i], err = respRead(r); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unexpected reply %q", line)
}

// RedisError is an error reply of a Redis server.
type RedisError string

func (e RedisError) Error() string { return string(e) }

// RedisCluster is a Redis Cluster of masters without replicas, made by redis-cli --cluster
// create.
type RedisCluster struct {
	Nodes []*RedisNode
	// Addrs are the nodes' addresses, the seeds a client needs.
	Addrs []string
}

// StartRedisCluster starts masters cluster nodes (each with its cluster bus on another free
// port), joins them with redis-cli --cluster create, and waits until every node reports the
// cluster ok with all 16384 slots assigned.
func StartRedisCluster(t testing.TB, masters int) *RedisCluster {
	t.Helper()
	c := &RedisCluster{}
	for range masters {
		n := newRedisNode(t)
		_, bus, _ := net.SplitHostPort(FreeAddr(t))
		n.start(append(append([]string{"--port", n.Port}, n.baseArgs()...),
			"--cluster-enabled", "yes", "--cluster-config-file", filepath.Join(n.Dir, "nodes.conf"),
			"--cluster-node-timeout", "2000", "--cluster-port", bus)...)
		c.Nodes = append(c.Nodes, n)
		c.Addrs = append(c.Addrs, n.Addr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args := append(append([]string{"--cluster", "create"}, c.Addrs...), "--cluster-replicas", "0", "--cluster-yes")
	out, err := exec.CommandContext(ctx, redisBinary(t, "redis-cli"), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	WaitFor(t, 20*time.Second, "every cluster node to report cluster_state:ok", func() bool {
		for _, n := range c.Nodes {
			info, err := n.DoString("CLUSTER", "INFO")
			if err != nil || !strings.Contains(info, "cluster_state:ok") || !strings.Contains(info, "cluster_slots_assigned:16384") ||
				!strings.Contains(info, fmt.Sprintf("cluster_known_nodes:%d", masters)) {
				return false
			}
		}
		return true
	})
	return c
}

// NodeOfKey returns the node that serves key's slot.
func (c *RedisCluster) NodeOfKey(t testing.TB, key string) *RedisNode {
	t.Helper()
	slot, err := c.Nodes[0].Do("CLUSTER", "KEYSLOT", key)
	if err != nil {
		t.Fatal(err)
	}
	slots, err := c.Nodes[0].Do("CLUSTER", "SLOTS")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range slots.([]any) {
		rng := r.([]any)
		lo, hi := rng[0].(int64), rng[1].(int64)
		if slot.(int64) < lo || slot.(int64) > hi {
			continue
		}
		port := strconv.FormatInt(rng[2].([]any)[1].(int64), 10)
		for _, n := range c.Nodes {
			if n.Port == port {
				return n
			}
		}
	}
	t.Fatalf("no node serves the slot of %q", key)
	return nil
}

// RedisSentinelOptions shape StartRedisSentinel's topology.
type RedisSentinelOptions struct {
	// MasterName is the name the Sentinels monitor the master under; default "mymaster".
	MasterName string
	// Sentinels is how many Sentinels watch the master; default 3 (quorum 2).
	Sentinels int
	// Password protects the master and the replica (requirepass, masterauth).
	Password string
	// SentinelPassword protects the Sentinels (requirepass, sentinel-pass).
	SentinelPassword string
}

// RedisSentinel is a master, one replica and Sentinels watching them.
type RedisSentinel struct {
	MasterName string
	Master     *RedisNode
	Replica    *RedisNode
	Sentinels  []*RedisNode
	// Addrs are the Sentinels' addresses.
	Addrs []string
	t     testing.TB
}

// StartRedisSentinel starts a master, a replica of it, and Sentinels, and waits until the
// replica is in sync and every Sentinel knows the master, the replica and the other
// Sentinels, so that a failover can start at once.
func StartRedisSentinel(t testing.TB, o RedisSentinelOptions) *RedisSentinel {
	t.Helper()
	if o.MasterName == "" {
		o.MasterName = "mymaster"
	}
	if o.Sentinels == 0 {
		o.Sentinels = 3
	}
	s := &RedisSentinel{MasterName: o.MasterName, t: t}
	auth := func(n *RedisNode) []string {
		n.Password = o.Password
		// A replica's full sync starts at once, not after the default 5 s wait for others.
		args := []string{"--repl-diskless-sync-delay", "0"}
		if o.Password == "" {
			return args
		}
		return append(args, "--requirepass", o.Password, "--masterauth", o.Password)
	}
	s.Master = newRedisNode(t)
	s.Master.start(append(append([]string{"--port", s.Master.Port}, s.Master.baseArgs()...), auth(s.Master)...)...)
	s.Replica = newRedisNode(t)
	s.Replica.start(append(append(append([]string{"--port", s.Replica.Port}, s.Replica.baseArgs()...), auth(s.Replica)...),
		"--replicaof", "127.0.0.1", s.Master.Port)...)
	WaitFor(t, 20*time.Second, "the replica to sync with the master", func() bool {
		return s.Replica.Info("replication", "master_link_status") == "up"
	})
	quorum := o.Sentinels/2 + 1
	for range o.Sentinels {
		n := newRedisNode(t)
		n.Password = o.SentinelPassword
		conf := []string{
			"port " + n.Port,
			"bind 127.0.0.1",
			"dir " + n.Dir,
			"daemonize no",
			fmt.Sprintf("sentinel monitor %s 127.0.0.1 %s %d", o.MasterName, s.Master.Port, quorum),
			fmt.Sprintf("sentinel down-after-milliseconds %s 1000", o.MasterName),
			fmt.Sprintf("sentinel failover-timeout %s 10000", o.MasterName),
			fmt.Sprintf("sentinel parallel-syncs %s 1", o.MasterName),
		}
		if o.Password != "" {
			conf = append(conf, fmt.Sprintf("sentinel auth-pass %s %s", o.MasterName, o.Password))
		}
		if o.SentinelPassword != "" {
			conf = append(conf, "requirepass "+o.SentinelPassword, "sentinel sentinel-pass "+o.SentinelPassword)
		}
		file := filepath.Join(n.Dir, "sentinel.conf")
		if err := os.WriteFile(file, []byte(strings.Join(conf, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		n.start(file, "--sentinel")
		s.Sentinels = append(s.Sentinels, n)
		s.Addrs = append(s.Addrs, n.Addr)
	}
	WaitFor(t, 30*time.Second, "every Sentinel to know the master, the replica and the other Sentinels", func() bool {
		for _, n := range s.Sentinels {
			if got := s.masterOf(n); got != s.Master.Addr {
				return false
			}
			m, err := n.Do("SENTINEL", "MASTER", o.MasterName)
			if err != nil {
				return false
			}
			f := flatMap(m)
			if f["num-slaves"] != "1" || f["num-other-sentinels"] != strconv.Itoa(o.Sentinels-1) {
				return false
			}
		}
		return true
	})
	return s
}

// flatMap reads a reply of alternating names and values.
func flatMap(v any) map[string]string {
	m := map[string]string{}
	a, _ := v.([]any)
	for i := 0; i+1 < len(a); i += 2 {
		k, _ := a[i].(string)
		val, _ := a[i+1].(string)
		m[k] = val
	}
	return m
}

// masterOf returns the master's address as the Sentinel n names it, or "".
func (s *RedisSentinel) masterOf(n *RedisNode) string {
	v, err := n.Do("SENTINEL", "GET-MASTER-ADDR-BY-NAME", s.MasterName)
	if err != nil {
		return ""
	}
	a, _ := v.([]any)
	if len(a) != 2 {
		return ""
	}
	host, _ := a[0].(string)
	port, _ := a[1].(string)
	return net.JoinHostPort(host, port)
}

// Failover asks the first Sentinel to fail over (SENTINEL FAILOVER), and waits until every
// Sentinel names the old replica as the master and it answers as one. Master and Replica are
// swapped.
func (s *RedisSentinel) Failover() {
	s.t.Helper()
	if _, err := s.Sentinels[0].Do("SENTINEL", "FAILOVER", s.MasterName); err != nil {
		s.t.Fatalf("SENTINEL FAILOVER: %v", err)
	}
	s.awaitPromotion()
}

// KillMaster kills the master by its PID and waits until the Sentinels have promoted the
// replica. Master and Replica are swapped; the old master stays down.
func (s *RedisSentinel) KillMaster() {
	s.t.Helper()
	s.Master.Kill()
	s.awaitPromotion()
}

func (s *RedisSentinel) awaitPromotion() {
	s.t.Helper()
	WaitFor(s.t, 30*time.Second, "the Sentinels to promote the replica", func() bool {
		if s.Replica.Info("replication", "role") != "master" {
			return false
		}
		for _, n := range s.Sentinels {
			if s.masterOf(n) != s.Replica.Addr {
				return false
			}
		}
		return true
	})
	s.Master, s.Replica = s.Replica, s.Master
}

// RedisCerts are the files of a test PKI: a CA, a server certificate for 127.0.0.1 and
// redis.test, a client certificate, and a second CA that signed none of them.
type RedisCerts struct {
	CAFile, ServerCertFile, ServerKeyFile, ClientCertFile, ClientKeyFile, OtherCAFile string
	// Client is a TLS config that trusts the CA and presents the client certificate.
	Client *tls.Config
}

// NewRedisCerts makes the PKI in a temporary directory (ECDSA P-256, valid for a day).
func NewRedisCerts(t testing.TB) *RedisCerts {
	t.Helper()
	dir := t.TempDir()
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	serial := int64(1)
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	now := time.Now()
	ca := func(name string) (*x509.Certificate, *ecdsa.PrivateKey, []byte) {
		k := newKey()
		serial++
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
		if err != nil {
			t.Fatal(err)
		}
		cert, _ := x509.ParseCertificate(der)
		return cert, k, der
	}
	leaf := func(caCert *x509.Certificate, caKey *ecdsa.PrivateKey, name string, usage x509.ExtKeyUsage, ips []net.IP, dns []string) ([]byte, []byte) {
		k := newKey()
		serial++
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: ips, DNSNames: dns,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kd, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return der, kd
	}
	caCert, caKey, caDER := ca("policy-engine test CA")
	_, _, otherDER := ca("another CA")
	srvDER, srvKey := leaf(caCert, caKey, "redis", x509.ExtKeyUsageServerAuth, []net.IP{net.IPv4(127, 0, 0, 1)}, []string{"redis.test"})
	cliDER, cliKey := leaf(caCert, caKey, "policy-agent", x509.ExtKeyUsageClientAuth, nil, nil)
	c := &RedisCerts{
		CAFile:         write("ca.pem", "CERTIFICATE", caDER),
		OtherCAFile:    write("other-ca.pem", "CERTIFICATE", otherDER),
		ServerCertFile: write("server.pem", "CERTIFICATE", srvDER),
		ServerKeyFile:  write("server-key.pem", "EC PRIVATE KEY", srvKey),
		ClientCertFile: write("client.pem", "CERTIFICATE", cliDER),
		ClientKeyFile:  write("client-key.pem", "EC PRIVATE KEY", cliKey),
	}
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	cert, err := tls.LoadX509KeyPair(c.ClientCertFile, c.ClientKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	c.Client = &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	return c
}

// StartRedisTLS starts a redis-server that speaks only TLS (--port 0, --tls-port) with the
// server certificate of certs; with authClients it requires a client certificate signed by
// the CA (--tls-auth-clients yes). Extra arguments follow.
func StartRedisTLS(t testing.TB, certs *RedisCerts, authClients bool, args ...string) *RedisNode {
	t.Helper()
	n := newRedisNode(t)
	n.TLS = certs.Client
	auth := "no"
	if authClients {
		auth = "yes"
	}
	n.start(append(append(append([]string{"--port", "0", "--tls-port", n.Port}, n.baseArgs()...),
		"--tls-cert-file", certs.ServerCertFile, "--tls-key-file", certs.ServerKeyFile,
		"--tls-ca-cert-file", certs.CAFile, "--tls-auth-clients", auth), args...)...)
	return n
}
