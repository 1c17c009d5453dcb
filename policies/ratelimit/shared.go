package ratelimit

import (
	"sync"
)

// sharedRef is a value kept in policy.Config.Shared for as long as some factory holds it.
//
// The agent makes a new factory on every config load and closes the old one after the swap,
// so a value that both hold survives the reload: the new factory takes a reference first, the
// old one drops its own afterwards, and the value is closed only when the last reference goes,
// which is when the agent stops for good (or a reload changed the settings the value was made
// from, which gives it another key).
type sharedRef struct {
	mu     sync.Mutex
	refs   int
	closed bool
	value  any
	close  func()
}

// acquire returns the value stored under key, making it with create when no factory holds
// one, and a release function that drops this reference; release is safe to call more than
// once. create returns the value and the function that closes it; it runs under the entry's
// lock, so one value is made per lifetime of the entry.
func acquire[T any](shared *sync.Map, key string, create func() (T, func())) (T, func()) {
	for {
		v, _ := shared.LoadOrStore(key, &sharedRef{})
		ref := v.(*sharedRef)
		ref.mu.Lock()
		if ref.closed {
			// The last holder is removing this entry; it is gone from the map once its lock
			// is released, so the next round makes a new one.
			ref.mu.Unlock()
			continue
		}
		if ref.refs == 0 {
			ref.value, ref.close = create()
		}
		ref.refs++
		val := ref.value.(T)
		ref.mu.Unlock()
		var once sync.Once
		return val, func() { once.Do(func() { ref.release(shared, key) }) }
	}
}

func (r *sharedRef) release(shared *sync.Map, key string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.refs--
	if r.refs > 0 {
		return
	}
	r.closed = true
	shared.CompareAndDelete(key, r)
	r.close()
}
