package kernel

import (
	"math"
	"sync/atomic"
)

// atomicFloat is a float64 that can be read and written concurrently.
type atomicFloat struct{ bits atomic.Uint64 }

func (f *atomicFloat) Load() float64   { return math.Float64frombits(f.bits.Load()) }
func (f *atomicFloat) Store(v float64) { f.bits.Store(math.Float64bits(v)) }
