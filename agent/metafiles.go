package agent

import (
	"slices"
	"sync"

	"github.com/puzpuzpuz/xsync/v4"
	"github.com/rs/zerolog"
)

// metaFiles are the files named by the metadata of compiled chain entries (a jwks_file in a
// route's metadata in the kernel's config). The agent's config does not name them, so a reload
// of it does not notice them; the agent watches them itself and, when one changes, drops the
// compiled entries that name it, so that the next request builds them again from the file.
// Files are recorded when an entry is compiled, never per request.
type metaFiles struct {
	mu    sync.Mutex
	files []string
	// grew is signalled when a file is recorded, for the watcher to take the new list.
	grew chan struct{}
}

func newMetaFiles() *metaFiles { return &metaFiles{grew: make(chan struct{}, 1)} }

// record notes the files md names, under the keys in fileKeys.
func (m *metaFiles) record(md map[string]string) {
	for k := range fileKeys {
		p := md[k]
		if p == "" {
			continue
		}
		m.mu.Lock()
		added := !slices.Contains(m.files, p)
		if added {
			m.files = append(m.files, p)
		}
		m.mu.Unlock()
		if added {
			select {
			case m.grew <- struct{}{}:
			default:
			}
		}
	}
}

// list returns the recorded files.
func (m *metaFiles) list() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.files)
}

// MetadataFilesGrew delivers when a compiled chain entry named a file not seen before.
func (e *Executor) MetadataFilesGrew() <-chan struct{} { return e.meta.grew }

// MetadataFiles lists the files named by compiled chain entries' metadata.
func (e *Executor) MetadataFiles() []string { return e.meta.list() }

// DropEntriesNaming drops the compiled chain entries of the config in force whose metadata
// names one of files, so that the next request compiles them again (reading the files anew).
// It returns how many were dropped.
func (e *Executor) DropEntriesNaming(files []string) int {
	s := e.acquire()
	if s == nil {
		return 0
	}
	defer s.release()
	names := func(md map[string]string) bool {
		for k := range fileKeys {
			if p := md[k]; p != "" && slices.Contains(files, p) {
				return true
			}
		}
		return false
	}
	dropped := 0
	s.cache.Range(func(h uint64, _ []*instance) bool {
		s.cache.Compute(h, func(old []*instance, loaded bool) ([]*instance, xsync.ComputeOp) {
			keep := slices.DeleteFunc(slices.Clone(old), func(in *instance) bool { return names(in.metadata) })
			n := len(old) - len(keep)
			if n == 0 {
				return old, xsync.CancelOp
			}
			dropped += n
			s.cached.Add(int64(-n))
			if len(keep) == 0 {
				return nil, xsync.DeleteOp
			}
			return keep, xsync.UpdateOp
		})
		return true
	})
	if dropped > 0 {
		e.log.Audit(zerolog.InfoLevel).Strs("files", files).Int("entries", dropped).
			Msg("files named by chain entries changed; those entries are compiled again on their next request")
	}
	return dropped
}
