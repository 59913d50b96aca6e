// A gateway that calls a backend for each request, forwarding B3 headers or not, calling once
// from the handler's goroutine or twice at once from goroutines of its own (fan-out). Usage:
// gateway PORT NEXT FORWARD(0|1) FANOUT(0|1), or gateway PORT slow (a backend answering after
// 300 ms). Standard library only: builds offline (GO111MODULE=off).
package main

import (
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

func main() {
	if os.Args[2] == "slow" {
		// A backend that answers after 300 ms, so that concurrent requests overlap.
		http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			time.Sleep(300 * time.Millisecond)
			w.Write([]byte("leaf\n"))
		})
		http.ListenAndServe("127.0.0.1:"+os.Args[1], nil)
		return
	}
	port, next, forward, fanout := os.Args[1], os.Args[2], os.Args[3] == "1", os.Args[4] == "1"
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		call := func(query string) ([]byte, error) {
			req, _ := http.NewRequest("GET", next+r.URL.Path+query, nil)
			if forward {
				for k, v := range r.Header {
					if l := strings.ToLower(k); l == "b3" || strings.HasPrefix(l, "x-b3-") {
						req.Header[k] = v
					}
				}
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return nil, err
			}
			defer resp.Body.Close()
			return io.ReadAll(resp.Body)
		}
		queries := []string{""}
		if fanout {
			queries = []string{"?a", "?b"}
		}
		bodies, errs := make([][]byte, len(queries)), make([]error, len(queries))
		if fanout {
			var wg sync.WaitGroup
			for i, q := range queries {
				wg.Add(1)
				go func(i int, q string) {
					defer wg.Done()
					bodies[i], errs[i] = call(q)
				}(i, q)
			}
			wg.Wait()
		} else {
			bodies[0], errs[0] = call("")
		}
		for i := range queries {
			if errs[i] != nil {
				http.Error(w, errs[i].Error(), http.StatusBadGateway)
				return
			}
			w.Write(bodies[i])
		}
	})
	http.ListenAndServe("127.0.0.1:"+port, nil)
}
