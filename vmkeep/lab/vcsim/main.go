// vcsim for the vmkeep lab: govmomi's vCenter simulator with one datacenter, a cluster of two
// hosts and one datastore, serving HTTPS with the lab's certificate and one login.
//
// Built by the project's set-up from Debian's govmomi sources (see vmkeep/lab/vcsim.py); prints
// one JSON line (URL, datastore directory) once it listens, and runs until SIGTERM or SIGINT.
//
// Unlike the stock simulator, whose NFC handler throws uploads away, this one really imports:
// ImportVApp's lease points each disk at /vmkeep-lab/nfc/LEASE/DISK, where a POST or PUT of a
// streamOptimized VMDK is decoded (qemu-img) into the new disk's flat file, the one /folder
// reads. A body that is not such a VMDK is refused (HTTP 400) and puts the lease in its error
// state, as vSphere does. GET /vmkeep-lab/nfc lists every lease with the bytes received, so a
// test or benchmark can see what a restore moved.
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path"
	"strings"
	"sync"
	"syscall"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const nfcPath = "/vmkeep-lab/nfc"

// diskFile is where an imported disk's data goes.
type diskFile struct {
	flat     string
	capacity int64
}

// leaseRecord is one import lease as GET /vmkeep-lab/nfc shows it.
type leaseRecord struct {
	ID       string           `json:"id"`
	Lease    string           `json:"lease"`
	VM       string           `json:"vm"`
	State    string           `json:"state"` // ready, error (an upload failed), done, aborted
	Bytes    int64            `json:"bytes"`
	Uploads  map[string]int64 `json:"uploads"` // disk file name → bytes received
	Progress int32            `json:"progress"`
	Error    string           `json:"error,omitempty"`
	files    map[string]diskFile
	lease    *trackedLease
}

// imports holds every lease ImportVApp gave out since the simulator started.
type imports struct {
	mu     sync.Mutex
	scheme string
	leases map[string]*leaseRecord
	order  []string
}

var registry = &imports{scheme: "http", leases: map[string]*leaseRecord{}}

// importingPool is a resource pool whose ImportVApp points the disks at our upload handler. It
// replaces the stock pools in the registry (embedded by value, as the property collector wants);
// the one stock method that asserts *simulator.ResourcePool, RelocateVM_Task with a pool, is not
// used by vmkeep.
type importingPool struct {
	simulator.ResourcePool
}

// trackedLease records when the client completes or aborts, and refuses to complete after a
// failed upload.
type trackedLease struct {
	simulator.HttpNfcLease
	record *leaseRecord
}

func (p *importingPool) ImportVApp(ctx *simulator.Context, req *types.ImportVApp) soap.HasFault {
	res := p.ResourcePool.ImportVApp(ctx, req)
	body, ok := res.(*methods.ImportVAppBody)
	if !ok || body.Fault_ != nil || body.Res == nil {
		return res
	}
	stock, ok := ctx.Session.Get(body.Res.Returnval).(*simulator.HttpNfcLease)
	if !ok {
		return res
	}
	vm := ctx.Map.Get(stock.Info.Entity).(*simulator.VirtualMachine)
	lease := &trackedLease{HttpNfcLease: *stock}
	record := registry.add(lease, vm.Name)
	var disks []*types.VirtualDisk
	for _, d := range vm.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok {
			disks = append(disks, disk)
		}
	}
	n := 0
	for i := range lease.Info.DeviceUrl {
		device := &lease.Info.DeviceUrl[i]
		if device.Disk == nil || !*device.Disk || n >= len(disks) {
			continue
		}
		disk := disks[n]
		n++
		backing, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
		if !ok {
			continue
		}
		var file object.DatastorePath
		file.FromString(backing.GetVirtualDeviceFileBackingInfo().FileName)
		store := datastoreDir(file.Datastore)
		if store == "" {
			continue
		}
		name := path.Base(file.Path)
		capacity := disk.CapacityInBytes
		if capacity == 0 {
			capacity = disk.CapacityInKB * 1024
		}
		record.files[name] = diskFile{path.Join(store, strings.TrimSuffix(file.Path, ".vmdk")+"-flat.vmdk"), capacity}
		device.TargetId = name
		device.Url = (&url.URL{Scheme: registry.scheme, Host: "*", Path: path.Join(nfcPath, record.ID, name)}).String()
	}
	ctx.Session.Put(lease)
	log.Printf("nfc lease %s (%s) for VM %s: %d disks", record.ID, record.Lease, vm.Name, len(record.files))
	return res
}

func (l *trackedLease) HttpNfcLeaseComplete(ctx *simulator.Context, req *types.HttpNfcLeaseComplete) soap.HasFault {
	registry.mu.Lock()
	state := l.record.State
	registry.mu.Unlock()
	if state != "ready" {
		return &methods.HttpNfcLeaseCompleteBody{Fault_: simulator.Fault(
			fmt.Sprintf("lease %s is %s, not ready: abort it", l.record.ID, state), &types.InvalidState{})}
	}
	registry.release(l.record, "done")
	return l.HttpNfcLease.HttpNfcLeaseComplete(ctx, req)
}

func (l *trackedLease) HttpNfcLeaseAbort(ctx *simulator.Context, req *types.HttpNfcLeaseAbort) soap.HasFault {
	registry.release(l.record, "aborted")
	return l.HttpNfcLease.HttpNfcLeaseAbort(ctx, req)
}

func (l *trackedLease) HttpNfcLeaseProgress(ctx *simulator.Context, req *types.HttpNfcLeaseProgress) soap.HasFault {
	registry.mu.Lock()
	l.record.Progress = req.Percent
	registry.mu.Unlock()
	return l.HttpNfcLease.HttpNfcLeaseProgress(ctx, req)
}

func datastoreDir(name string) string {
	for _, e := range simulator.Map.All("Datastore") {
		if ds := e.(*simulator.Datastore); ds.Name == name {
			return ds.Info.GetDatastoreInfo().Url
		}
	}
	return ""
}

func (im *imports) add(lease *trackedLease, vm string) *leaseRecord {
	im.mu.Lock()
	defer im.mu.Unlock()
	id := fmt.Sprintf("lease-%d", len(im.order)+1)
	record := &leaseRecord{ID: id, Lease: lease.Self.Value, VM: vm, State: "ready", Uploads: map[string]int64{},
		files: map[string]diskFile{}, lease: lease}
	lease.record = record
	im.leases[id] = record
	im.order = append(im.order, id)
	return record
}

// release moves a lease to state "to" and says which state it was in.
func (im *imports) release(r *leaseRecord, to string) string {
	im.mu.Lock()
	defer im.mu.Unlock()
	was := r.State
	r.State = to
	log.Printf("nfc lease %s of VM %s: %s → %s after %d bytes", r.ID, r.VM, was, to, r.Bytes)
	return was
}

// fail puts the lease in its error state, with the message its error property reports.
func (im *imports) fail(r *leaseRecord, msg string) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if r.State == "ready" {
		r.State = "error"
	}
	r.Error = msg
	r.lease.State = types.HttpNfcLeaseStateError
	r.lease.Error = &types.LocalizedMethodFault{Fault: &types.SystemError{Reason: msg}, LocalizedMessage: msg}
}

// counter counts the bytes of an upload as they arrive.
type counter struct {
	r      io.Reader
	record *leaseRecord
	name   string
}

func (c *counter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	registry.mu.Lock()
	c.record.Bytes += int64(n)
	c.record.Uploads[c.name] += int64(n)
	registry.mu.Unlock()
	return n, err
}

func (im *imports) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == nfcPath || r.URL.Path == nfcPath+"/" {
		im.mu.Lock()
		list := []*leaseRecord{}
		for _, id := range im.order {
			list = append(list, im.leases[id])
		}
		out, _ := json.Marshal(map[string]interface{}{"leases": list})
		im.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(out)
		return
	}
	if r.Method != http.MethodPost && r.Method != http.MethodPut {
		http.Error(w, "upload a disk with POST or PUT", http.StatusMethodNotAllowed)
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, nfcPath+"/"), "/")
	if len(parts) != 2 {
		http.NotFound(w, r)
		return
	}
	im.mu.Lock()
	record, ok := im.leases[parts[0]]
	state := ""
	var file diskFile
	known := false
	if ok {
		state = record.State
		file, known = record.files[parts[1]]
	}
	im.mu.Unlock()
	if !ok || !known {
		http.Error(w, "no such lease or disk", http.StatusNotFound)
		return
	}
	if state != "ready" {
		_, _ = io.Copy(io.Discard, r.Body)
		http.Error(w, fmt.Sprintf("lease %s is %s", record.ID, state), http.StatusConflict)
		return
	}
	if status, err := im.importDisk(r, record, parts[1], file); err != nil {
		log.Printf("nfc %s %s of VM %s: %s", r.Method, parts[1], record.VM, err)
		im.fail(record, fmt.Sprintf("importing %s: %s", parts[1], err))
		_, _ = io.Copy(io.Discard, r.Body) // the client gets the answer, not a broken pipe
		http.Error(w, err.Error(), status)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// importDisk receives a streamOptimized VMDK beside the disk and decodes it into its flat file.
func (im *imports) importDisk(r *http.Request, record *leaseRecord, name string, file diskFile) (int, error) {
	body := &counter{r.Body, record, name}
	head := make([]byte, 512)
	if _, err := io.ReadFull(body, head); err != nil {
		return http.StatusBadRequest, fmt.Errorf("the body is not a VMDK (%d bytes or fewer)", len(head))
	}
	if !bytes.Equal(head[:4], []byte("KDMV")) {
		return http.StatusBadRequest, fmt.Errorf("the body is not a sparse VMDK (no KDMV magic)")
	}
	stream := file.flat + ".vmkeep-import"
	defer os.Remove(stream)
	f, err := os.Create(stream)
	if err != nil {
		return http.StatusInternalServerError, err
	}
	_, err = f.Write(head)
	if err == nil {
		_, err = io.Copy(f, body)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return http.StatusBadRequest, fmt.Errorf("receiving the stream: %v", err)
	}
	out, err := exec.Command("qemu-img", "info", "--output=json", "-f", "vmdk", stream).Output()
	if err != nil {
		return http.StatusBadRequest, fmt.Errorf("not a readable VMDK: %v", stderr(err))
	}
	var info struct {
		Size     int64 `json:"virtual-size"`
		Specific struct {
			Data struct {
				CreateType string `json:"create-type"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return http.StatusInternalServerError, err
	}
	if info.Specific.Data.CreateType != "streamOptimized" {
		return http.StatusBadRequest, fmt.Errorf("a %q VMDK, not streamOptimized", info.Specific.Data.CreateType)
	}
	if info.Size > file.capacity {
		return http.StatusBadRequest, fmt.Errorf("the stream's disk is %d bytes, the VM's %d", info.Size, file.capacity)
	}
	if out, err := exec.Command("qemu-img", "convert", "-f", "vmdk", "-O", "raw", stream, file.flat).CombinedOutput(); err != nil {
		return http.StatusBadRequest, fmt.Errorf("decoding the stream failed: %v: %s", err, strings.TrimSpace(string(out)))
	}
	if err := os.Truncate(file.flat, file.capacity); err != nil {
		return http.StatusInternalServerError, err
	}
	im.mu.Lock()
	received := record.Uploads[name]
	im.mu.Unlock()
	log.Printf("nfc %s %s of VM %s: %d bytes received, imported into %s", r.Method, name, record.VM, received,
		file.flat)
	return http.StatusOK, nil
}

func stderr(err error) string {
	if exit, ok := err.(*exec.ExitError); ok && len(exit.Stderr) > 0 {
		return strings.TrimSpace(string(exit.Stderr))
	}
	return err.Error()
}

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
	for _, e := range simulator.Map.All("ResourcePool") {
		if pool, ok := e.(*simulator.ResourcePool); ok {
			simulator.Map.Put(&importingPool{*pool})
		}
	}

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, password)}
	if *cert != "" {
		pair, err := tls.LoadX509KeyPair(*cert, *key)
		if err != nil {
			log.Fatal(err)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
		registry.scheme = "https"
	}
	if model.Service.ServeMux == nil {
		model.Service.ServeMux = http.NewServeMux()
	}
	model.Service.ServeMux.HandleFunc(nfcPath, registry.serve)
	model.Service.ServeMux.HandleFunc(nfcPath+"/", registry.serve)
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
