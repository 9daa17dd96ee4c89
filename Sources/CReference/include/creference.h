// C code written with Xen's own io/ring.h and io/blkif.h macros, for two jobs:
//  - a conformance frontend (conformance.c): a blkfront that drives any blkif backend (SoftDev's
//    Swift BlockTap) through the emulated hypervisor and reports one result per check;
//  - a reference backend (reference_backend.c): a minimal blkif backend serving a null device,
//    the protocol's cost on this machine, for `softdev bench` to compare against.
// This header uses only plain C types so that Swift can import it without the Xen headers.
#ifndef SOFTDEV_CREFERENCE_H
#define SOFTDEV_CREFERENCE_H

#include <stdint.h>

// MARK: The conformance frontend

// What the frontend is given. All pointers are into the guest's own memory (one memfd of 4 KiB
// frames, see localxen.h): `ring` and `data` must be page-aligned frames of it.
struct cref_front_env {
    void *ring;                    // 2^ring_order pages: the shared ring, initialised by C
    uint32_t ring_frame;           // frame number of ring's first page (pages are consecutive)
    uint32_t ring_order;           // 0 ... 4
    void *grant_table;             // the guest's grant_entry_v1 table (LOCALXEN_GRANT_ENTRIES)
    uint32_t first_free_ref;       // grant refs [first_free_ref, first_free_ref + free_refs)
    uint32_t free_refs;            //   are C's to use
    void *data;                    // data_pages consecutive pages for buffers and indirect pages
    uint32_t data_frame;           // frame number of data's first page
    uint32_t data_pages;           // at least 1100 for the full suite at ring order 4
    uint16_t backend_domid;        // the domain granted access
    uint16_t persistent;           // feature-persistent negotiated: grant buffers once, RW
    uint32_t max_indirect_segments;// the backend's feature-max-indirect-segments (0: none)
    uint32_t discard;              // the backend's feature-discard
    uint32_t discard_secure;       // the backend's discard-secure
    int wait_fd;                   // the event channel: poll for POLLIN, then read 8 bytes
    void (*notify)(void *ctx);     // the event channel: notify the backend
    void *notify_ctx;
    // Optional: the device's bytes as the backend's device holds them (NULL: not checked), to
    // check that what the backend acknowledged is where the sector numbers say.
    const uint8_t *device_bytes;
    uint32_t timeout_ms;           // longest wait for a response (0: 10 s)
};

struct cref_front;                 // opaque

// Initialises the shared ring (SHARED_RING_INIT, FRONT_RING_INIT for 2^order pages), grants its
// pages (and, when persistent, every data page) to the backend. Writes the ring's 2^order grant
// refs to ring_refs (room for 16). Returns NULL (and sets errno) on bad arguments or no memory.
struct cref_front *cref_front_init(const struct cref_front_env *env, uint32_t *ring_refs);

// One check's outcome.
struct cref_check {
    char name[64];
    int32_t passed;
    char message[200];
};

// Runs the conformance suite against the connected backend, whose device has `sectors` 512-byte
// sectors (its `sectors` node, written at Connected); writes up to `max` results and returns how
// many checks ran (may exceed `max`: the rest are dropped).
int cref_front_run_suite(struct cref_front *front, uint64_t sectors, struct cref_check *results, int max);

// Revokes the grants the frontend still holds (the backend must have unmapped them: call after
// it disconnected) and frees the frontend. Returns how many grants stayed busy.
int cref_front_free(struct cref_front *front);

// MARK: The reference backend

struct cref_backend_config {
    void *guest_memory;            // the guest's whole memory, mapped (base of frame 0)
    uint32_t total_frames;         // its size in frames
    void *ring;                    // the shared ring, mapped contiguously (2^ring_order pages)
    uint32_t ring_order;
    uint16_t domid;                // our domain id: grants must name it (0)
    uint16_t persistent;           // feature-persistent negotiated: keep buffer grants mapped
    uint32_t max_indirect_segments;// what we advertised (at most 256)
    uint64_t sectors;              // the null device's size, 512-byte sectors
    int wait_fd;                   // our end of the event channel: poll, then read 8 bytes
    int notify_fd;                 // >= 0: write 8 bytes here to notify (an eventfd) ...
    void (*notify)(void *ctx);     // ... else call this
    void *notify_ctx;
    uint32_t poll_us;              // > 0: poll the ring this long before sleeping, adaptively, as
                                   // SoftDev's ring threads do (AdaptivePoller); 0: never
};

struct cref_backend;               // opaque

struct cref_backend_stats {
    uint64_t served;               // responses BLKIF_RSP_OKAY
    uint64_t failed;               // responses ERROR or EOPNOTSUPP
    uint64_t notifies;             // notifications sent
    uint64_t wakeups;              // times the thread slept and woke
    int32_t broken;                // 1 when the frontend published an impossible req_prod
};

// Starts serving on a new thread. Returns NULL (and sets errno) on failure.
struct cref_backend *cref_backend_start(const struct cref_backend_config *config);
// Stops the thread, unmaps every grant it still holds, frees the backend; fills *stats if given.
void cref_backend_stop(struct cref_backend *backend, struct cref_backend_stats *stats);
// Counters so far (read while running: approximate).
void cref_backend_get_stats(const struct cref_backend *backend, struct cref_backend_stats *stats);

// MARK: The netif conformance frontend (netif_conformance.c)

// Up to this many queues.
#define CREF_NET_MAX_QUEUES 8
// Pages a queue's environment gives for tx data and for rx buffers (one per ring slot).
#define CREF_NET_QUEUE_PAGES 256

// One queue's pages and event channels. Pointers are into the guest's memory (page-aligned
// frames); `frame` fields are their frame numbers (pages are consecutive).
struct cref_net_queue_env {
    void *tx_ring;                 // one page: the tx shared ring, initialised by C
    uint32_t tx_ring_frame;
    void *rx_ring;                 // one page: the rx shared ring
    uint32_t rx_ring_frame;
    void *tx_data;                 // CREF_NET_QUEUE_PAGES pages, granted read-only per slot
    uint32_t tx_data_frame;
    void *rx_data;                 // CREF_NET_QUEUE_PAGES pages, granted writable per posted buffer
    uint32_t rx_data_frame;
    int tx_wait_fd;                // the tx event channel: poll for POLLIN, then read 8 bytes
    int rx_wait_fd;                // the rx one (the same fd when the channels are not split)
    void *tx_notify_ctx;           // passed to notify() to kick the backend's tx ...
    void *rx_notify_ctx;           // ... and rx channel (the same when not split)
};

// A frame's offload metadata as the endpoint (the device below the backend) sees it.
enum { CREF_NET_CSUM_NONE = 0, CREF_NET_CSUM_VALIDATED = 1, CREF_NET_CSUM_PARTIAL = 2 };
struct cref_net_meta {
    uint32_t queue;                // the queue it came in on / is for
    uint8_t csum;                  // CREF_NET_CSUM_*
    uint8_t gso_type;              // XEN_NETIF_GSO_TYPE_* (0: none)
    uint16_t gso_size;
    uint16_t csum_start, csum_offset;   // CREF_NET_CSUM_PARTIAL
};

struct cref_netfront_env {
    void *grant_table;             // the guest's grant_entry_v1 table
    uint32_t first_free_ref;       // grant refs [first_free_ref, first_free_ref + free_refs)
    uint32_t free_refs;            //   are C's to use
    uint16_t backend_domid;
    uint16_t split_event_channels; // informational: the queues' fds differ
    uint32_t queues;               // 1 ... CREF_NET_MAX_QUEUES
    struct cref_net_queue_env queue[CREF_NET_MAX_QUEUES];
    void (*notify)(void *ctx);     // notify an event channel (ctx: a queue's *_notify_ctx)
    // The endpoint below the backend: the next frame it took from the guest (waiting up to
    // timeout_ms), as its length with its bytes in buf (at most capacity) and meta, or -1 if
    // none came; and a frame to hand up to the guest.
    int64_t (*endpoint_take)(void *ctx, uint8_t *buf, uint32_t capacity, struct cref_net_meta *meta, uint32_t timeout_ms);
    void (*endpoint_send)(void *ctx, const uint8_t *buf, uint32_t length, const struct cref_net_meta *meta);
    void *endpoint_ctx;
    uint32_t timeout_ms;           // longest wait for a response or a frame (0: 5 s)
};

struct cref_netfront;              // opaque

// Initialises every queue's rings (SHARED_RING_INIT, FRONT_RING_INIT), grants them, and posts
// a ring's worth of rx buffers (as netfront does before it connects). Writes each queue's
// tx-ring-ref and rx-ring-ref to tx_refs[q], rx_refs[q]. NULL (errno set) on bad arguments.
struct cref_netfront *cref_netfront_init(const struct cref_netfront_env *env, uint32_t *tx_refs, uint32_t *rx_refs);
// Runs the netif suite against the connected backend (feature-sg and GSO negotiated); writes
// up to `max` results and returns how many checks ran.
int cref_netfront_run_suite(struct cref_netfront *front, struct cref_check *results, int max);
// Revokes every grant still held (call after the backend disconnected) and frees the frontend;
// returns how many grants stayed busy.
int cref_netfront_free(struct cref_netfront *front);

// MARK: The netif reference backend (netif_reference_backend.c)

struct cref_net_backend_config {
    void *guest_memory;            // the guest's whole memory, mapped (base of frame 0)
    uint32_t total_frames;
    void *tx_ring;                 // the tx and rx shared rings, mapped (one page each)
    void *rx_ring;
    uint16_t domid;                // our domain id: grants must name it
    uint16_t gso;                  // the frontend asked for feature-gso-tcpv4: large rx frames get a GSO extra
    uint32_t rx_frame_size;        // > 0: fill every posted rx buffer with frames of this size (<= 65535)
    uint16_t rx_gso_size;          // the MSS in rx frames' GSO extra
    int tx_wait_fd;                // our ends of the event channels (the same fd when not split)
    int rx_wait_fd;
    void (*notify)(void *ctx);     // notify the frontend
    void *tx_notify_ctx, *rx_notify_ctx;
    uint32_t poll_us;              // the adaptive poll window, as SoftDev's ring threads (0: never)
};

struct cref_net_backend_stats {
    uint64_t tx_frames, tx_bytes;  // frames from the guest, copied out and dropped (the sink)
    uint64_t tx_errors;            // tx frames answered ERROR
    uint64_t rx_frames, rx_bytes;  // frames put in the guest's buffers
    uint64_t notifies, wakeups;
    int32_t broken;                // 1 when the frontend broke a ring
};

struct cref_net_backend;           // opaque
struct cref_net_backend *cref_net_backend_start(const struct cref_net_backend_config *config);
void cref_net_backend_stop(struct cref_net_backend *backend, struct cref_net_backend_stats *stats);
void cref_net_backend_get_stats(const struct cref_net_backend *backend, struct cref_net_backend_stats *stats);
// From any thread: from its next turn on, the backend fills rx buffers with frames of `size`
// bytes (0: none) and, for frames above 1514 bytes when the frontend takes GSO, a GSO extra of
// `gso_size`.
void cref_net_backend_set_rx(struct cref_net_backend *backend, uint32_t size, uint16_t gso_size);

// MARK: The TAP forwarder (tap_forwarder.c)

// Frames, bytes (without the virtio_net_hdr) and lost writes per direction: [0] a -> b, [1] b -> a.
struct cref_tap_forwarder_stats {
    uint64_t frames[2], bytes[2], drops[2];
};

struct cref_tap_forwarder;         // opaque
// Opens (creating if needed) the TAP interfaces `name_a` and `name_b` with IFF_TAP | IFF_NO_PI |
// IFF_VNET_HDR, a 10-byte header and TUNSETOFFLOAD `offloads` (TUN_F_* bits), brings them up
// and starts one thread per direction. NULL with `error` written on failure.
struct cref_tap_forwarder *cref_tap_forwarder_start(const char *name_a, const char *name_b, unsigned offloads,
                                                    char *error, unsigned long error_len);
// Stops and joins the threads, writes the final counters (if `stats`), closes both TAPs.
void cref_tap_forwarder_stop(struct cref_tap_forwarder *forwarder, struct cref_tap_forwarder_stats *stats);
void cref_tap_forwarder_get_stats(const struct cref_tap_forwarder *forwarder, struct cref_tap_forwarder_stats *stats);

// MARK: The usbif conformance frontend (usbif_conformance.c)

// Pages the environment gives for URB buffers: 16 per ring slot (USBIF_MAX_SEGMENTS_PER_REQUEST).
#define CREF_USB_DATA_PAGES 256

// What the test plugs into the controller for the suite (ports are 1-based).
struct cref_usb_layout {
    uint8_t storage_port;          // a soft Bulk-Only storage stick (high speed) of storage_bytes
    uint8_t keyboard_port;         // a soft HID boot keyboard (full speed), typed into by type_text
    uint8_t iso_port;              // a test device (high speed) whose isochronous IN endpoint 4 fills
                                   // packet i's first half with (i * 16 + b) & 0xff
    uint8_t ports;                 // the controller's num-ports
    uint64_t storage_bytes;
};

struct cref_usbfront_env {
    void *urb_ring;                // one page: the URB shared ring, initialised by C
    uint32_t urb_ring_frame;
    void *conn_ring;               // one page: the connection shared ring
    uint32_t conn_ring_frame;
    void *data;                    // CREF_USB_DATA_PAGES pages for URB buffers and ISO descriptors
    uint32_t data_frame;
    void *grant_table;             // the guest's grant_entry_v1 table
    uint32_t first_free_ref;       // grant refs [first_free_ref, first_free_ref + free_refs)
    uint32_t free_refs;            //   are C's to use
    uint16_t backend_domid;
    int wait_fd;                   // the one event channel of both rings: poll, then read 8 bytes
    void (*notify)(void *ctx);
    void *notify_ctx;
    // The test's hands: type `text` on the keyboard; plug the device `spec` names into `port`
    // ("" empties it). 0 on success.
    int (*type_text)(void *ctx, const char *text);
    int (*set_port)(void *ctx, int port, const char *spec);
    void *test_ctx;
    struct cref_usb_layout layout;
    uint32_t timeout_ms;           // longest wait for a response or an event (0: 5 s)
};

struct cref_usbfront;              // opaque

// Initialises both rings (SHARED_RING_INIT, FRONT_RING_INIT), grants them, and posts every
// connection request (as xen-hcd does before it connects). Writes the urb-ring-ref and
// conn-ring-ref. NULL (errno set) on bad arguments.
struct cref_usbfront *cref_usbfront_init(const struct cref_usbfront_env *env, uint32_t *urb_ring_ref, uint32_t *conn_ring_ref);
// Runs the usbif suite against the connected backend; writes up to `max` results and returns
// how many checks ran.
int cref_usbfront_run_suite(struct cref_usbfront *front, struct cref_check *results, int max);
// The bench: for `seconds`, Bulk-Only READ(10) (or WRITE(10) when `write`) commands of
// `bytes` each (a CBW, the data in URBs of `chunk` bytes at most, as many in flight as the ring
// holds, as usb-storage puts them, the CSW) to the stick at `address` on layout.storage_port,
// which must be enumerated and configured (cref_usbfront_enumerate). Returns the commands done,
// -1 on an error; *urbs gets the URBs answered.
int64_t cref_usbfront_bench_bot(struct cref_usbfront *front, uint8_t address, uint32_t bytes, uint32_t chunk, int write, double seconds,
                                uint64_t *urbs);
// The bench: for `seconds`, GET_DESCRIPTOR(DEVICE) of 18 bytes to `address` on `port`, one at a
// time (as the USB core's synchronous control messages). Returns the transfers, -1 on an error.
int64_t cref_usbfront_bench_control(struct cref_usbfront *front, int port, uint8_t address, double seconds);
// GET_DESCRIPTOR(DEVICE) at address 0, SET_ADDRESS(address), SET_CONFIGURATION(1) on `port`,
// after its connection event; 0 on success.
int cref_usbfront_enumerate(struct cref_usbfront *front, int port, uint8_t address);
// Revokes every grant still held (call after the backend disconnected) and frees the
// frontend; returns how many grants stayed busy.
int cref_usbfront_free(struct cref_usbfront *front);

#endif
