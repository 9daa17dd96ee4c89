#!/bin/bash
# Build the Xen lab from Debian's packages: Xen 4.17, a Debian kernel as PV dom0
# and domU, and busybox initramfs images for both.
#
#   lab/xen/build.sh            build what is missing or out of date
#   LAB_WORK=DIR build.sh       use another work folder (default lab/xen/work)
#
# Outputs: work/img/{xen,vmlinuz,dom0-initrd.gz,domU-initrd.gz}
# Cache: downloaded .debs are kept by file name (name_version_arch.deb); each
# unpacked tree and image carries a stamp of what it was made from (package
# versions and the lab's own input files), so a second run only checks.
set -euo pipefail

LAB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${LAB_WORK:-$LAB/work}
# shellcheck source=lib/host.sh
. "$LAB/lib/host.sh"

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
step() { lab_say "[$(elapsed)s] $*"; }

[ "$(id -u)" = 0 ] || lab_die "build.sh must run as root (apt-get, dpkg -x with owners, depmod)"
command -v apt-get >/dev/null || lab_die "this lab needs a Debian (bookworm) host with apt-get"

XENVER=4.17
# Packages unpacked into the dom0/domU images (the kernel is added below).
DEB_PKGS=(xen-hypervisor-$XENVER-amd64 xen-utils-$XENVER xen-utils-common xenstore-utils
  libxenmisc$XENVER libxencall1 libxendevicemodel1 libxenevtchn1 libxenforeignmemory1
  libxengnttab1 libxenstore4 libxentoolcore1 libxentoollog1 libxenhypfs1 libyajl2
  busybox-static qemu-system-xen qemu-system-data)
# Host packages: tools used here, plus programs and libraries copied from the
# host into the images (all Debian bookworm packages; most are always there).
HOST_PKGS=(qemu-system-x86 cpio kmod xz-utils gzip coreutils e2fsprogs bash util-linux
  libgcc-s1 libspice-server1 libusb-1.0-0 libfdt1 libpixman-1-0 libjpeg62-turbo libglib2.0-0
  iperf3 libiperf0 tcpdump libpcap0.8 iproute2 iputils-ping ethtool make)
# dom0's USB: the EHCI controller run.sh gives QEMU and its usb-storage stick (the kernel's
# usb-storage binds it; softdev's host() and QEMU's qusb detach it while they serve it).
DOM0_MODULES=(xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback xen-netback
  tun bridge loop virtio_pci 9pnet_virtio 9p virtio_blk ext4 crc32c_generic
  ehci-pci usb-storage sd_mod)
# The domU's USB: xen-hcd (built below, out of tree), sticks (usb-storage, sd_mod) and a HID
# boot keyboard (usbhid, hid-generic; evdev for /dev/input/event*).
DOMU_MODULES=(xen-blkfront xen-netfront xenfs ext4 crc32c_generic
  usbcore usb-storage sd_mod usbhid hid-generic evdev)
# Programs copied from the host into both images (with their libraries). The network tools
# (iperf3, tcpdump, iproute2's ip, iputils' ping, ethtool) shadow busybox's applets of the same
# name in /usr/bin; a guest script under busybox sh calls them by full path.
HOST_TOOLS=(/usr/bin/bash /usr/bin/flock /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/tune2fs
  /usr/sbin/dumpe2fs /usr/bin/dd /usr/bin/sha256sum /usr/sbin/losetup /usr/sbin/blockdev
  /usr/bin/iperf3 /usr/bin/tcpdump /usr/sbin/ip /usr/bin/ping /usr/sbin/ethtool)

# ---------------------------------------------------------------- host packages
missing=()
for p in "${HOST_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=0
apt_update() { [ $apt_updated = 1 ] || { step "apt-get update"; apt-get update -qq || lab_die "apt-get update failed"; apt_updated=1; }; }
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  step "installing host packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || lab_die "apt-get install ${missing[*]} failed"
fi

# ------------------------------------------------------- resolve kernel ABI
kernel_abi() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: linux-image-\(.*-amd64\)$/\1/p' | head -1; }
ABI=$(kernel_abi)
if [ -z "$ABI" ]; then apt_update; ABI=$(kernel_abi); fi
[ -n "$ABI" ] || lab_die "cannot resolve the kernel ABI from linux-image-amd64's dependencies (apt lists?)"
step "kernel ABI $ABI (from linux-image-amd64)"
DEB_PKGS+=("linux-image-$ABI")

# ------------------------------------------------------------ download .debs
DEBS=$WORK/debs
mkdir -p "$DEBS"
declare -A DEBFILE=()
# fetch_debs: find each package's current file name and download the missing
# ones. Returns non-zero (without dying) so the caller can refresh stale lists.
fetch_debs() {
  local uris need=() _url file _size _hash p
  uris=$(apt-get download --print-uris "${DEB_PKGS[@]}" 2>&1) || { echo "$uris" >&2; return 1; }
  DEBFILE=()
  while read -r _url file _size _hash; do
    DEBFILE[${file%%_*}]=$file
    [ -s "$DEBS/$file" ] || need+=("${file%%_*}")
  done < <(grep "^'" <<<"$uris")
  for p in "${DEB_PKGS[@]}"; do [ -n "${DEBFILE[$p]:-}" ] || { echo "no download candidate for $p" >&2; return 1; }; done
  if [ ${#need[@]} -gt 0 ]; then
    step "downloading ${#need[@]} packages: ${need[*]}"
    (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "${need[@]}" >/dev/null) || return 1
  fi
  for p in "${DEB_PKGS[@]}"; do [ -s "$DEBS/${DEBFILE[$p]}" ] || { echo "missing ${DEBFILE[$p]}" >&2; return 1; }; done
}
if ! fetch_debs; then
  [ $apt_updated = 0 ] || lab_die "cannot download the lab's packages"
  lab_say "download failed; refreshing the package lists and trying again"
  apt_update
  ABI=$(kernel_abi); DEB_PKGS[-1]="linux-image-$ABI"
  fetch_debs || lab_die "cannot download the lab's packages (${DEB_PKGS[*]})"
fi
# Drop .debs of versions no longer used.
for f in "$DEBS"/*.deb; do
  case " ${DEBFILE[*]} " in *" ${f##*/} "*) ;; *) rm -f "$f" ;; esac
done

# Key of everything an image is made from: the .deb files, the host packages'
# versions and the lab's own files that go into the images.
host_versions=$(dpkg-query -W -f='${Package}=${Version}\n' "${HOST_PKGS[@]}" | sort)
KEY_USER=$( { printf '%s\n' "${DEBFILE[@]}" | sort; echo "$host_versions"; } | sha256sum | cut -c1-16)
KEY_KERNEL=$(echo "${DEBFILE[linux-image-$ABI]}" | sha256sum | cut -c1-16)

# A stamp file holds the key of what its output was made from.
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$1"; }
files_key() { (cd "$LAB" && cat "$@" | sha256sum | cut -c1-16); }

# ------------------------------------------------- xen-hcd, out of tree
# Debian's kernel has no PV USB frontend (CONFIG_USB_XEN_HCD is not set): build
# drivers/usb/host/xen-hcd.c from linux-source (the version of the linux-image package)
# against linux-headers-$ABI. Only the .c file and the module are kept.
KVER=${DEBFILE[linux-image-$ABI]#*_}; KVER=${KVER%%_*}
HCD=$WORK/xen-hcd
KEY_HCD=$(echo "$ABI $KVER" | sha256sum | cut -c1-16)
if ! stamp_ok "$HCD/.lab-stamp" "$KEY_HCD" || [ ! -s "$HCD/xen-hcd.ko" ]; then
  hdr=linux-headers-$ABI
  if ! dpkg-query -W -f='${Status}' "$hdr" 2>/dev/null | grep -q 'install ok installed'; then
    step "installing $hdr (to build xen-hcd)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$hdr" >/dev/null \
      || { apt_update; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$hdr" >/dev/null; } \
      || lab_die "apt-get install $hdr failed"
  fi
  step "building xen-hcd from linux-source-${ABI%%.0-*}=$KVER"
  rm -rf "$HCD"; mkdir -p "$HCD/src"
  (cd "$HCD" && apt-get download -q -o APT::Sandbox::User=root "linux-source-${ABI%%.0-*}=$KVER" >/dev/null) \
    || lab_die "apt-get download linux-source-${ABI%%.0-*}=$KVER failed"
  dpkg-deb --fsys-tarfile "$HCD"/linux-source-*.deb | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' \
    | tar -xJ -C "$HCD/src" --wildcards --strip-components=4 '*/drivers/usb/host/xen-hcd.c' \
    || lab_die "no drivers/usb/host/xen-hcd.c in linux-source"
  rm -f "$HCD"/linux-source-*.deb
  echo 'obj-m := xen-hcd.o' > "$HCD/src/Kbuild"
  make -s -C "/usr/src/linux-headers-$ABI" M="$HCD/src" modules > "$HCD/make.log" 2>&1 \
    || { cat "$HCD/make.log"; lab_die "building xen-hcd failed"; }
  strip --strip-debug -o "$HCD/xen-hcd.ko" "$HCD/src/xen-hcd.ko"
  stamp_set "$HCD/.lab-stamp" "$KEY_HCD"
fi

# -------------------------------------------------------------- unpack .debs
STAGE=$WORK/stage
if ! stamp_ok "$STAGE/.lab-stamp" "$KEY_USER"; then
  step "unpacking user-space packages into $STAGE"
  rm -rf "$STAGE"; mkdir -p "$STAGE"
  for p in "${DEB_PKGS[@]}"; do
    [ "$p" = "linux-image-$ABI" ] && continue
    dpkg -x "$DEBS/${DEBFILE[$p]}" "$STAGE" || lab_die "dpkg -x ${DEBFILE[$p]} failed"
  done
  stamp_set "$STAGE/.lab-stamp" "$KEY_USER"
fi
KTREE=$WORK/kernel
if ! stamp_ok "$KTREE/.lab-stamp" "$KEY_KERNEL"; then
  step "unpacking ${DEBFILE[linux-image-$ABI]} and running depmod"
  rm -rf "$KTREE"; mkdir -p "$KTREE"
  dpkg -x "$DEBS/${DEBFILE[linux-image-$ABI]}" "$KTREE" || lab_die "dpkg -x of the kernel failed"
  [ -f "$KTREE/boot/vmlinuz-$ABI" ] || lab_die "no boot/vmlinuz-$ABI in the kernel package"
  [ -d "$KTREE/lib/modules/$ABI" ] || lab_die "no lib/modules/$ABI in the kernel package"
  depmod -b "$KTREE" "$ABI" || lab_die "depmod on the unpacked kernel failed"
  stamp_set "$KTREE/.lab-stamp" "$KEY_KERNEL"
fi
LAB_LIBPATH=$STAGE/usr/lib/x86_64-linux-gnu:$STAGE/usr/lib/xen-$XENVER/lib/x86_64-linux-gnu
export LAB_LIBPATH

# ------------------------------------------------------------------- images
IMG=$WORK/img
mkdir -p "$IMG"
if ! stamp_ok "$IMG/.boot.stamp" "$KEY_USER-$KEY_KERNEL" || [ ! -s "$IMG/xen" ] || [ ! -s "$IMG/vmlinuz" ]; then
  zcat "$STAGE/boot/xen-$XENVER-amd64.gz" > "$IMG/xen.tmp" || lab_die "no boot/xen-$XENVER-amd64.gz in $STAGE"
  mv "$IMG/xen.tmp" "$IMG/xen"
  cp "$KTREE/boot/vmlinuz-$ABI" "$IMG/vmlinuz"
  echo "$ABI" > "$IMG/kernel-abi"
  stamp_set "$IMG/.boot.stamp" "$KEY_USER-$KEY_KERNEL"
fi

# add_modules ROOT MODULE...: copy the modules and everything modules.dep says
# they need into ROOT/lib/modules/ABI, then depmod -b ROOT.
add_modules() {
  local root=$1; shift
  local mdir=$KTREE/lib/modules/$ABI m norm path line
  local -A want=()
  for m in "$@"; do
    norm=${m//-/_}
    line=$(awk -v n="$norm" '{ f=$1; sub(/:$/,"",f); b=f; sub(/.*\//,"",b); sub(/\.ko(\.[a-z]+)?$/,"",b); gsub(/-/,"_",b); if (b==n) { print; exit } }' "$mdir/modules.dep")
    if [ -z "$line" ]; then
      grep -q "/${m}.ko\$\|/${norm}.ko\$" "$mdir/modules.builtin" && continue
      lab_die "kernel module $m is neither in modules.dep nor built in ($ABI)"
    fi
    for path in $line; do want[${path%:}]=1; done
  done
  for path in "${!want[@]}"; do
    mkdir -p "$root/lib/modules/$ABI/$(dirname "$path")"
    cp "$mdir/$path" "$root/lib/modules/$ABI/$path"
  done
  cp "$mdir"/modules.{builtin,builtin.modinfo,order} "$root/lib/modules/$ABI/"
  depmod -b "$root" "$ABI" || lab_die "depmod -b $root failed"
}

# base_root ROOT: busybox, host tools with their libraries, basic /etc.
base_root() {
  local root=$1 a
  rm -rf "$root"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc,proc,sys,dev,run,tmp,mnt,root,var/log}
  ln -s ../run "$root/var/run"
  mkdir -p "$root/usr/lib"; ln -s ../../lib/x86_64-linux-gnu "$root/usr/lib/x86_64-linux-gnu"
  cp "$STAGE/bin/busybox" "$root/bin/busybox"
  for a in "${HOST_TOOLS[@]}"; do
    [ -x "$a" ] || lab_die "host tool $a is missing"
    cp -L "$a" "$root/usr/bin/"
  done
  ln -s mke2fs "$root/usr/bin/mkfs.ext4"; ln -s e2fsck "$root/usr/bin/fsck.ext4"
  [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
  # busybox applets for everything not provided by a real program.
  while read -r a; do
    [ -e "$root/$a" ] || [ -e "$root/usr/bin/${a##*/}" ] || ln -s /bin/busybox "$root/$a"
  done < <("$root/bin/busybox" --list-full)
  [ -e "$root/bin/bash" ] || ln -s /usr/bin/bash "$root/bin/bash"
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
  printf 'root:x:0:\n' > "$root/etc/group"
}

# finish_root ROOT OUT: copy every library the image's programs need, pack it.
finish_root() {
  local root=$1 out=$2 f elfs=()
  while IFS= read -r -d '' f; do lab_is_elf "$f" && elfs+=("$f"); done \
    < <(find "$root" -type f \( -perm -u+x -o -name '*.so*' \) ! -path '*/lib/modules/*' -print0)
  lab_copy_with_libs "$root" lib/x86_64-linux-gnu "${elfs[@]}"
  # Second pass: libraries of the libraries just copied (ldd lists them already,
  # but dlopen()ed ones like libgcc_s are added explicitly).
  cp -L /usr/lib/x86_64-linux-gnu/libgcc_s.so.1 "$root/lib/x86_64-linux-gnu/"
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -1 > "$out.tmp"
  mv "$out.tmp" "$out"
}

DOM0=$WORK/dom0-root
KEY_DOM0=$KEY_USER-$KEY_KERNEL-$(files_key build.sh lib/host.sh dom0/init)
if ! stamp_ok "$IMG/.dom0.stamp" "$KEY_DOM0" || [ ! -s "$IMG/dom0-initrd.gz" ]; then
  step "building dom0 initrd"
  base_root "$DOM0"
  mkdir -p "$DOM0"/{usr/lib,usr/libexec,usr/share/qemu,etc/xen,var/lib/xen,var/log/xen,mnt/host}
  cp -a "$STAGE/usr/lib/xen-$XENVER" "$DOM0/usr/lib/"
  rm -rf "$DOM0/usr/lib/xen-$XENVER/lib/python" "$DOM0/usr/lib/xen-$XENVER/bin/pygrub"
  cp -a "$STAGE/usr/lib/xen-common" "$DOM0/usr/lib/" 2>/dev/null || true
  cp -a "$STAGE"/usr/lib/x86_64-linux-gnu/lib{xen,yajl}* "$DOM0/lib/x86_64-linux-gnu/"
  cp -a "$STAGE"/usr/bin/xenstore* "$DOM0/usr/bin/"
  cp -a "$STAGE/etc/xen/scripts" "$DOM0/etc/xen/"
  cp -a "$STAGE/usr/libexec/xen-qemu-system-i386" "$DOM0/usr/libexec/"
  cp -a "$STAGE/usr/share/qemu/keymaps" "$DOM0/usr/share/qemu/"
  printf 'autoballoon="off"\n' > "$DOM0/etc/xen/xl.conf"
  install -m 755 "$LAB/dom0/init" "$DOM0/init"
  add_modules "$DOM0" "${DOM0_MODULES[@]}"
  finish_root "$DOM0" "$IMG/dom0-initrd.gz"
  stamp_set "$IMG/.dom0.stamp" "$KEY_DOM0"
fi

DOMU=$WORK/domU-root
KEY_DOMU=$KEY_USER-$KEY_KERNEL-$KEY_HCD-$(files_key build.sh lib/host.sh domU/init domU/lab-domu.sh)
if ! stamp_ok "$IMG/.domU.stamp" "$KEY_DOMU" || [ ! -s "$IMG/domU-initrd.gz" ]; then
  step "building domU initrd"
  base_root "$DOMU"
  cp -a "$STAGE"/usr/bin/xenstore* "$DOMU/usr/bin/"
  install -m 755 "$LAB/domU/init" "$DOMU/init"
  install -m 644 "$LAB/domU/lab-domu.sh" "$DOMU/lab-domu.sh"
  add_modules "$DOMU" "${DOMU_MODULES[@]}"
  mkdir -p "$DOMU/lib/modules/$ABI/extra"
  cp "$HCD/xen-hcd.ko" "$DOMU/lib/modules/$ABI/extra/"
  depmod -b "$DOMU" "$ABI" || lab_die "depmod -b $DOMU failed"
  finish_root "$DOMU" "$IMG/domU-initrd.gz"
  stamp_set "$IMG/.domU.stamp" "$KEY_DOMU"
fi

step "done: $(cd "$IMG" && for f in xen vmlinuz dom0-initrd.gz domU-initrd.gz; do printf '%s %s  ' "$f" "$(du -h "$f" | cut -f1)"; done)"
