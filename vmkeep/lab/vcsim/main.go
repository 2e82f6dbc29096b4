// vcsim for the vmkeep lab: govmomi's vCenter simulator with one datacenter, a cluster of two
// hosts and one datastore, serving HTTPS with the lab's certificate and one login.
//
// Built by the project's set-up from Debian's govmomi sources (see vmkeep/lab/vcsim.py); prints
// one JSON line (URL, datastore directory) once it listens, and runs until SIGTERM or SIGINT.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8989", "host:port to serve the SDK and /folder on")
	cert := flag.String("cert", "", "PEM certificate (HTTPS); plain HTTP without it")
	key := flag.String("key", "", "PEM key of -cert")
	user := flag.String("user", "administrator@vsphere.local", "the login name")
	flag.Parse()
	password := os.Getenv("VCSIM_PASSWORD")
	if password == "" {
		log.Fatal("set VCSIM_PASSWORD")
	}

	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster = 1
	model.ClusterHost = 2
	model.Host = 0
	model.Machine = 0
	model.Datastore = 1
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, password)}
	if *cert != "" {
		pair, err := tls.LoadX509KeyPair(*cert, *key)
		if err != nil {
			log.Fatal(err)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	}
	server := model.Service.NewServer()
	defer server.Close()

	stores := []string{}
	for _, ds := range simulator.Map.All("Datastore") {
		stores = append(stores, ds.(*simulator.Datastore).Info.GetDatastoreInfo().Url)
	}
	u := *server.URL
	u.User = nil
	out, _ := json.Marshal(map[string]interface{}{"url": u.String(), "datastores": stores})
	os.Stdout.Write(append(out, '\n'))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
