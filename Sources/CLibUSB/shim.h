#ifndef SOFTDEV_CLIBUSB_SHIM_H
#define SOFTDEV_CLIBUSB_SHIM_H
#include <libusb.h>

/* iso_packet_desc is a flexible array member, which Swift does not import: one packet's
   descriptor by index. */
static inline struct libusb_iso_packet_descriptor *softdev_libusb_iso_packet(struct libusb_transfer *transfer, int index) {
    return &transfer->iso_packet_desc[index];
}

#endif
