import Synchronization

/// Completions that other threads (a device's worker, an AIO reaper, a libusb callback) hand to
/// the thread that owns a ring, taken by that thread in batches.
///
/// The ring thread looks at the queue on every turn of its loop, so an empty queue costs one
/// atomic load, not a lock. Taking a batch swaps two buffers that keep their capacity: nothing is
/// allocated per batch once both have grown to the most completions ever pending at once.
/// `post` says whether the queue was empty before it: only then must the ring thread be woken,
/// since a non-empty queue has a wake-up on its way already.
public final class RingCompletionQueue<Element>: @unchecked Sendable {
    @usableFromInline let pending: Mutex<[Element]>
    /// How many completions `pending` holds, written under the lock and read without it.
    @usableFromInline let count = Atomic<Int>(0)
    /// The batch being finished: touched by the ring thread alone.
    @usableFromInline @exclusivity(unchecked) var draining: [Element]

    /// `capacity`: room reserved in both buffers (a ring's size covers every request in flight).
    public init(capacity: Int) {
        var a: [Element] = [], b: [Element] = []
        a.reserveCapacity(capacity); b.reserveCapacity(capacity)
        pending = Mutex(a)
        draining = b
    }

    /// From any thread: queues `element`; true if the queue was empty, so that the caller must
    /// wake the ring thread.
    @inlinable public func post(_ element: Element) -> Bool {
        pending.withLock { q in
            q.append(element)
            count.store(q.count, ordering: .releasing)
            return q.count == 1
        }
    }

    /// From any thread: queues every element of `elements` under one lock; true if the queue
    /// was empty (wake the ring thread).
    @inlinable public func post<S: Sequence>(contentsOf elements: S) -> Bool where S.Element == Element {
        pending.withLock { q in
            let wasEmpty = q.isEmpty
            q.append(contentsOf: elements)
            count.store(q.count, ordering: .releasing)
            return wasEmpty && !q.isEmpty
        }
    }

    /// Whether anything is queued (one atomic load).
    @inlinable public var isEmpty: Bool { count.load(ordering: .acquiring) == 0 }

    /// On the ring thread: takes everything queued and gives it to `body` as one array, which
    /// `body` may take over by swapping in an empty one of its own (the elements then change
    /// hands without a copy); whatever is left in it afterwards is dropped. Returns how many
    /// there were.
    @inlinable @discardableResult public func drainBatch(_ body: (inout [Element]) -> Void) -> Int {
        if count.load(ordering: .acquiring) == 0 { return 0 }
        pending.withLock { q in
            swap(&q, &draining)
            count.store(0, ordering: .releasing)
        }
        let n = draining.count
        body(&draining)
        draining.removeAll(keepingCapacity: true)
        return n
    }
}
