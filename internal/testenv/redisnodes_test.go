package testenv

import (
	"testing"
	"time"
)

// TestRedisTopologies starts each topology once: the helpers' own check.
func TestRedisTopologies(t *testing.T) {
	t.Run("cluster", func(t *testing.T) {
		start := time.Now()
		c := StartRedisCluster(t, 3)
		t.Logf("3-master cluster up in %v", time.Since(start))
		n := c.NodeOfKey(t, "{abc}")
		if _, err := n.Do("SET", "{abc}", "1"); err != nil {
			t.Fatalf("SET on the node of the slot: %v", err)
		}
	})
	t.Run("sentinel", func(t *testing.T) {
		start := time.Now()
		s := StartRedisSentinel(t, RedisSentinelOptions{Password: "data", SentinelPassword: "sentinel"})
		t.Logf("master, replica and 3 Sentinels up in %v", time.Since(start))
		old := s.Master.Addr
		start = time.Now()
		s.Failover()
		t.Logf("failover in %v", time.Since(start))
		if s.Master.Addr == old || s.Master.Info("replication", "role") != "master" {
			t.Fatal("no failover")
		}
	})
	t.Run("tls", func(t *testing.T) {
		certs := NewRedisCerts(t)
		n := StartRedisTLS(t, certs, true)
		if v, err := n.DoString("PING"); err != nil || v != "PONG" {
			t.Fatalf("PING over mTLS: %v %v", v, err)
		}
		n.TLS = nil
		if _, err := n.Do("PING"); err == nil {
			t.Fatal("plain text answered on the TLS port")
		}
	})
}
