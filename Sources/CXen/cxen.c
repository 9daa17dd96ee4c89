#define _GNU_SOURCE
#include <sys/mman.h>
#include "cxen.h"

int cxen_eventfd(unsigned initval, int flags) { return eventfd(initval, flags); }
int cxen_memfd_create(const char *name, unsigned flags) { return memfd_create(name, flags); }
