//! Acknowledgements, many per frame (issue 22).
//!
//! A bulk batch used to ack its two hundred messages one `basic.ack` each.
//! Every ack is a frame the worker encodes and sends, and, for a quorum
//! queue, a command RabbitMQ's channel turns into an entry of the queue's
//! Raft log: per lead, as much again as its publish. AMQP acks many
//! messages with one frame only as "every message up to this tag"
//! (`multiple`), and batches end out of order, so a channel's acks go
//! through an [`AckWindow`]: a message is acked once its lead's result is
//! committed (never before), and as one frame with every other committed
//! message below it when no earlier message of the channel is still being
//! converted.
//!
//! A message still waiting (a bulk lead held back for its keys, a batch
//! still converting) would keep those above it unacknowledged, and so
//! count against the channel's prefetch: past `hold` of them, they are
//! acked one by one, as before.

use std::collections::BTreeSet;

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicRejectOptions},
    Channel,
};

/// One frame to send, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Every unacknowledged message of the channel up to this tag.
    UpTo(u64),
    /// This message alone.
    One(u64),
}

/// The messages of one channel: handed out to conversions, or done and
/// waiting to be acked with others.
#[derive(Debug)]
pub struct AckWindow {
    /// Received, and neither done nor settled otherwise yet.
    open: BTreeSet<u64>,
    /// Done (their results committed), not yet acked.
    done: BTreeSet<u64>,
    /// How many done messages may wait for an earlier open one.
    hold: usize,
}

impl AckWindow {
    pub fn new(hold: usize) -> AckWindow {
        AckWindow { open: BTreeSet::new(), done: BTreeSet::new(), hold }
    }

    /// A message arrived. Tags arrive in increasing order on a channel;
    /// every message must be announced here before it can be done.
    pub fn received(&mut self, tag: u64) {
        self.open.insert(tag);
    }

    /// The message's result is committed: the frames that may go now.
    pub fn done(&mut self, tag: u64) -> Vec<Ack> {
        // A tag not open is acked already (or settled): naming it again
        // would make RabbitMQ close the channel.
        if self.open.remove(&tag) {
            self.done.insert(tag);
        }
        self.ready()
    }

    /// The message was settled another way (rejected to the dead letters):
    /// it no longer holds the others back. Called only once that frame is
    /// sent, so that no `UpTo` can overtake it and ack it instead.
    pub fn settled(&mut self, tag: u64) -> Vec<Ack> {
        self.open.remove(&tag);
        self.ready()
    }

    /// Everything done, acked now (the channel is about to close).
    pub fn flush(&mut self) -> Vec<Ack> {
        let mut acks = self.up_to_first_open();
        acks.extend(std::mem::take(&mut self.done).into_iter().map(Ack::One));
        acks
    }

    fn ready(&mut self) -> Vec<Ack> {
        let mut acks = self.up_to_first_open();
        if self.done.len() > self.hold {
            acks.extend(std::mem::take(&mut self.done).into_iter().map(Ack::One));
        }
        acks
    }

    /// One `UpTo` for the done messages below the first open one. Its tag
    /// is the highest of them: a tag RabbitMQ still holds unacknowledged
    /// (one acked before, alone, would make it close the channel).
    fn up_to_first_open(&mut self) -> Vec<Ack> {
        let below = match self.open.first() {
            Some(&first) => {
                let above = self.done.split_off(&first);
                std::mem::replace(&mut self.done, above)
            }
            None => std::mem::take(&mut self.done),
        };
        below.last().map(|&tag| vec![Ack::UpTo(tag)]).unwrap_or_default()
    }
}

/// A bulk lane's prefetch and how many done messages may wait in it, for
/// a lane that holds `window` messages open at once (in flight and waiting
/// for a batch): room for twice as many done ones beside them. The done
/// ones waiting always leave room for a whole window open, so a message
/// that never ends cannot stop the lane (past `hold`, they go one by one).
pub fn bulk_room(window: u16) -> (u16, usize) {
    let window = u32::from(window.max(1));
    let prefetch = (window * 3).min(u32::from(u16::MAX));
    let hold = prefetch - window.min(prefetch);
    (prefetch as u16, hold as usize)
}

/// The acks of one consuming channel. Frames are decided and sent in one
/// turn at a time, so they leave in the order the window decided them (an
/// `UpTo` sent after a later one could name a tag already acked); the
/// window itself is only locked for a moment, so that the session's loop,
/// announcing each delivery, never waits for frames being sent.
pub struct Acks {
    channel: Channel,
    window: std::sync::Mutex<AckWindow>,
    turn: tokio::sync::Mutex<()>,
}

impl Acks {
    pub fn new(channel: Channel, hold: usize) -> Acks {
        Acks { channel, window: std::sync::Mutex::new(AckWindow::new(hold)), turn: tokio::sync::Mutex::new(()) }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, AckWindow> {
        self.window.lock().expect("the ack window's lock")
    }

    /// A delivery arrived on this channel (before it goes anywhere else).
    pub fn received(&self, delivery: &Delivery) {
        self.window().received(delivery.delivery_tag);
    }

    /// Acks messages whose results are committed (with others, maybe
    /// later).
    pub async fn ack_all(&self, deliveries: &[Delivery]) {
        let _turn = self.turn.lock().await;
        let acks = {
            let mut window = self.window();
            deliveries.iter().flat_map(|d| window.done(d.delivery_tag)).collect()
        };
        self.send(acks).await;
    }

    /// Parks a message in the dead-letter queue.
    pub async fn reject(&self, delivery: &Delivery) {
        let _turn = self.turn.lock().await;
        if let Err(e) = delivery.reject(BasicRejectOptions { requeue: false }).await {
            // Not settled: it stays open (an `UpTo` naming a later tag
            // would ack it instead of parking it), and comes back.
            tracing::warn!(error = %e, "reject failed; the message will come back");
            return;
        }
        let acks = self.window().settled(delivery.delivery_tag);
        self.send(acks).await;
    }

    /// Acks every message done (before the channel closes).
    pub async fn flush(&self) {
        let _turn = self.turn.lock().await;
        let acks = self.window().flush();
        self.send(acks).await;
    }

    async fn send(&self, acks: Vec<Ack>) {
        for ack in acks {
            let (tag, multiple) = match ack {
                Ack::UpTo(tag) => (tag, true),
                Ack::One(tag) => (tag, false),
            };
            if let Err(e) = self.channel.basic_ack(tag, BasicAckOptions { multiple }).await {
                // The channel is gone: RabbitMQ redelivers, and the
                // recorded results make the second deliveries no-ops.
                tracing::warn!(error = %e, "ack failed; the messages will come back and be recognised as done");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(hold: usize, tags: impl IntoIterator<Item = u64>) -> AckWindow {
        let mut w = AckWindow::new(hold);
        tags.into_iter().for_each(|t| w.received(t));
        w
    }

    #[test]
    fn done_messages_go_in_one_frame_once_no_earlier_one_is_open_and_never_before() {
        // 3 is still converting: 4 and 5 wait, and no frame names 3 or
        // anything above it until 3 is done; then one frame acks 3 to 5.
        let mut w = window(10, 1..=5);
        let mut sent = w.done(1);
        sent.extend(w.done(2));
        sent.extend(w.done(4));
        sent.extend(w.done(5));
        assert_eq!(sent, vec![Ack::UpTo(1), Ack::UpTo(2)]);
        assert_eq!(w.done(3), vec![Ack::UpTo(5)]);
    }

    #[test]
    fn a_frame_names_a_done_tag_not_a_rejected_one() {
        // 2 was rejected (settled at the broker): an UpTo naming 2 would
        // name a tag the broker no longer holds.
        let mut w = window(10, 1..=3);
        assert_eq!(w.done(1), vec![Ack::UpTo(1)]);
        assert_eq!(w.settled(2), vec![]);
        assert_eq!(w.done(3), vec![Ack::UpTo(3)]);
    }

    #[test]
    fn a_rejected_message_holds_the_others_back_until_it_is_settled() {
        let mut w = window(10, 1..=3);
        assert_eq!(w.done(2), vec![]);
        assert_eq!(w.done(3), vec![]);
        assert_eq!(w.settled(1), vec![Ack::UpTo(3)]);
    }

    #[test]
    fn past_hold_waiting_messages_are_acked_one_by_one() {
        // 1 is held back (a lead waiting for its keys): 2..=4 wait for it
        // up to `hold` (2), then go alone, so the prefetch is not eaten up.
        let mut w = window(2, 1..=6);
        assert_eq!(w.done(2), vec![]);
        assert_eq!(w.done(3), vec![]);
        assert_eq!(w.done(4), vec![Ack::One(2), Ack::One(3), Ack::One(4)]);
        // Acked alone, they are not named again; 5 waits, then 1 is done.
        assert_eq!(w.done(5), vec![]);
        assert_eq!(w.done(1), vec![Ack::UpTo(5)]);
    }

    #[test]
    fn flush_acks_everything_done_and_nothing_open() {
        let mut w = window(10, 1..=5);
        assert_eq!(w.done(1), vec![Ack::UpTo(1)]);
        assert_eq!(w.done(3), vec![]);
        assert_eq!(w.done(5), vec![]);
        assert_eq!(w.flush(), vec![Ack::One(3), Ack::One(5)]);
        assert_eq!(w.flush(), vec![]);
    }

    #[test]
    fn a_rejected_message_while_others_overflow_is_never_acked() {
        // 1 is open; 2 and 3 overflow `hold` and go alone; 4 is rejected
        // (settled); 5 done: the UpTo once 1 is done names 5, covering
        // 1 and 5 only (2, 3 acked, 4 settled).
        let mut w = window(1, 1..=5);
        assert_eq!(w.done(2), vec![]);
        assert_eq!(w.done(3), vec![Ack::One(2), Ack::One(3)]);
        assert_eq!(w.settled(4), vec![]);
        assert_eq!(w.done(5), vec![]);
        assert_eq!(w.done(1), vec![Ack::UpTo(5)]);
    }

    #[test]
    fn a_bulk_lane_leaves_room_for_a_whole_window_open() {
        assert_eq!(bulk_room(2_200), (6_600, 4_400));
        assert_eq!(bulk_room(1), (3, 2));
        for window in [0, 1, 7, 2_200, 21_845, 21_846, 40_000, u16::MAX] {
            let (prefetch, hold) = bulk_room(window);
            assert!(hold < usize::from(prefetch), "{window}: {prefetch} {hold}");
            assert!(
                usize::from(prefetch) - hold >= usize::from(window.max(1)).min(usize::from(prefetch)),
                "{window}: {prefetch} {hold}"
            );
        }
    }

    #[test]
    fn a_tag_done_twice_is_acked_once() {
        let mut w = window(10, 1..=2);
        assert_eq!(w.done(1), vec![Ack::UpTo(1)]);
        assert_eq!(w.done(1), vec![]);
        assert_eq!(w.done(2), vec![Ack::UpTo(2)]);
    }
}
