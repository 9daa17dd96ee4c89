import CXen
import Core

/// netif's transmit ring (io/netif.h): the guest's frames, one 12-byte request per slot (a
/// data slot, or an extra-info slot after one), a 4-byte response per slot.
public enum NetifTxRing: RingTypes {
    public typealias Request = netif_tx_request
    public typealias Response = netif_tx_response
    public static var entrySize: Int { MemoryLayout<netif_tx_sring_entry>.size }
}

/// netif's receive ring: the guest posts buffers (a grant per page), the backend answers each
/// slot with a response (a data slot) or an extra-info record (after the first), 8 bytes both,
/// so a slot is written as its raw 8 bytes.
public enum NetifRxRing: RingTypes {
    public typealias Request = netif_rx_request
    public typealias Response = UInt64
    public static var entrySize: Int { MemoryLayout<netif_rx_sring_entry>.size }
}

/// Numbers fixed by io/netif.h and by what Linux's netfront and netback enforce.
public enum Netif {
    // Transmit flags (NETTXF_*).
    public static let txChecksumBlank = UInt16(NETTXF_csum_blank)
    public static let txDataValidated = UInt16(NETTXF_data_validated)
    public static let txMoreData = UInt16(NETTXF_more_data)
    public static let txExtraInfo = UInt16(NETTXF_extra_info)
    // Receive flags (NETRXF_*).
    public static let rxDataValidated = UInt16(NETRXF_data_validated)
    public static let rxChecksumBlank = UInt16(NETRXF_csum_blank)
    public static let rxMoreData = UInt16(NETRXF_more_data)
    public static let rxExtraInfo = UInt16(NETRXF_extra_info)
    // Extra-info records.
    public static let extraGSO = UInt8(XEN_NETIF_EXTRA_TYPE_GSO)
    public static let extraMulticastAdd = UInt8(XEN_NETIF_EXTRA_TYPE_MCAST_ADD)
    public static let extraMulticastDel = UInt8(XEN_NETIF_EXTRA_TYPE_MCAST_DEL)
    public static let extraTypeMax = UInt8(XEN_NETIF_EXTRA_TYPE_MAX)
    public static let extraFlagMore = UInt8(XEN_NETIF_EXTRA_FLAG_MORE)
    public static let gsoTCPv4 = UInt8(XEN_NETIF_GSO_TYPE_TCPV4)
    public static let gsoTCPv6 = UInt8(XEN_NETIF_GSO_TYPE_TCPV6)
    // Response statuses.
    public static let statusOkay = Int16(NETIF_RSP_OKAY)
    public static let statusError = Int16(NETIF_RSP_ERROR)
    public static let statusDropped = Int16(NETIF_RSP_DROPPED)
    public static let statusNull = Int16(NETIF_RSP_NULL)

    /// XEN_NETIF_NR_SLOTS_MIN (18): a frame to the guest takes at most this many data slots
    /// (netfront's limit); a frame from the guest may have this many slots after its first
    /// (netback's XEN_NETBK_LEGACY_SLOTS_MAX), more are dropped.
    public static let maxSlots = Int(XEN_NETIF_NR_SLOTS_MIN)
    /// Slots after the first beyond which a frontend is broken, not merely odd (netback's
    /// fatal_skb_slots): a frame of more than 21 slots disconnects the vif.
    public static let fatalSlots = 20
    /// The shortest first slot netback takes (ETH_HLEN).
    public static let minimumFirstSlot = 14
    /// The largest frame netif can describe (XEN_NETIF_MAX_TX_SIZE).
    public static let maxFrameSize = Int(XEN_NETIF_MAX_TX_SIZE)
    /// Multicast addresses a guest may add (netback's XEN_NETBK_MCAST_MAX).
    public static let maxMulticastAddresses = 64
}
