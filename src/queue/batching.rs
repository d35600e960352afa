//! Which bulk leads go into the next batch (issue 22).
//!
//! A batch holds the advisory locks of its leads' keys (normalised e-mail,
//! company: `store::snapshot`) from its first statements to its commit.
//! Two batches in flight that share a key therefore run one after the
//! other, the second one holding its connection and its other keys while
//! it waits: with eight batches of two hundred leads in flight and common
//! companies, batches spent most of their time waiting on each other
//! (seconds per batch, measured), and the cores sat idle.
//!
//! So a worker forms its batches from the messages it has received, not
//! merely in the order they came: a lead whose key a batch in flight holds
//! waits here, where it costs nothing, and leads that share no key with
//! any batch in flight go first. The keys come with each message (see
//! [`crate::queue::KEYS_HEADER`]); they only steer the order, the
//! advisory locks still decide. A message without keys goes with the next
//! batch, as before.
//!
//! A contact's account is not always known when the message is sent: a
//! contact made or merged without an account gets the account of the
//! first later lead of its e-mail that has a company, and from then on
//! every lead merging into it locks that account too. So the batcher
//! learns, per e-mail key, the company key of the first lead of that
//! e-mail it sent into a batch with one, and a lead of that e-mail waits
//! on that company too.
//!
//! Leads that share a key are converted in the order they arrived, as
//! without this: one that waits also holds back every later lead sharing
//! one of its keys, so no lead overtakes an earlier one it could create a
//! record for or merge into (the dry run plans them in that order). A lead
//! waits only while an earlier lead sharing its keys waits or converts, so
//! it never waits for ever.

use std::collections::{HashMap, HashSet, VecDeque};

/// What a message says of the keys its lead is converted under (see
/// `store::snapshot::lead_lock_keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    pub email: Option<i64>,
    pub company: Option<i64>,
    /// Keys known to be locked besides (the accounts of the contacts its
    /// e-mail matched when it was sent).
    pub more: Vec<i64>,
}

impl Keys {
    /// From the message header: e-mail key, company key (0: none), more.
    pub fn from_header(keys: &[i64]) -> Keys {
        let some = |k: Option<&i64>| k.copied().filter(|&k| k != 0);
        Keys { email: some(keys.first()), company: some(keys.get(1)), more: keys.iter().skip(2).copied().collect() }
    }
}

/// E-mails whose companies a batcher remembers at most; past that it
/// forgets them all (a hint lost, no more), so a worker that runs for
/// months keeps its memory.
const REMEMBERED_EMAILS: usize = 100_000;

/// Messages waiting for a batch, and the keys of the batches in flight.
#[derive(Debug)]
pub struct Batcher<T> {
    waiting: VecDeque<(T, Keys)>,
    /// The company key of the first lead of each e-mail key that went into
    /// a batch with one: the contact of that e-mail, made or found without
    /// an account, has that company's account now.
    company_of_email: HashMap<i64, i64>,
    /// Keys held by batches in flight (by one each: a batch never takes a
    /// key another holds).
    held: HashSet<i64>,
}

/// The keys a batch holds while it converts: given back with
/// [`Batcher::release`] when it ends, however it ends.
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "a batch's keys must be released when it ends"]
pub struct Held(Vec<i64>);

impl<T> Default for Batcher<T> {
    fn default() -> Self {
        Batcher { waiting: VecDeque::new(), company_of_email: HashMap::new(), held: HashSet::new() }
    }
}

impl<T> Batcher<T> {
    pub fn push(&mut self, item: T, keys: Keys) {
        self.waiting.push_back((item, keys));
    }

    /// Every key the lead of `keys` may lock, as far as is known now.
    fn all_keys<'a>(&'a self, keys: &'a Keys) -> impl Iterator<Item = i64> + 'a {
        let learned = keys.email.and_then(|e| self.company_of_email.get(&e)).copied();
        keys.email.into_iter().chain(keys.company).chain(keys.more.iter().copied()).chain(learned)
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The next batch: up to `max` waiting messages, in arrival order,
    /// none sharing a key with a batch in flight nor with an earlier
    /// message left waiting. `None` when fewer than `min` (at least one)
    /// may go: nothing is taken then.
    pub fn take(&mut self, max: usize, min: usize) -> Option<(Vec<T>, Held)> {
        let (max, min) = (max.max(1), min.max(1));
        // Keys of the messages passed over so far: later messages sharing
        // one wait behind them.
        let mut passed: HashSet<i64> = HashSet::new();
        let mut chosen: Vec<usize> = Vec::with_capacity(max);
        for (i, (_, keys)) in self.waiting.iter().enumerate() {
            if chosen.len() == max {
                break;
            }
            if self.all_keys(keys).any(|k| self.held.contains(&k) || passed.contains(&k)) {
                passed.extend(self.all_keys(keys));
            } else {
                chosen.push(i);
            }
        }
        if chosen.len() < min {
            return None;
        }
        let mut items = Vec::with_capacity(chosen.len());
        let mut keys: Vec<i64> = Vec::new();
        let mut next = chosen.iter().copied().peekable();
        let mut left = VecDeque::with_capacity(self.waiting.len() - chosen.len());
        let mut learned: Vec<(i64, i64)> = Vec::new();
        for (i, (item, k)) in std::mem::take(&mut self.waiting).into_iter().enumerate() {
            if next.peek() == Some(&i) {
                next.next();
                items.push(item);
                keys.extend(self.all_keys(&k));
                if let (Some(email), Some(company)) = (k.email, k.company) {
                    learned.push((email, company));
                }
            } else {
                left.push_back((item, k));
            }
        }
        self.waiting = left;
        if self.company_of_email.len() > REMEMBERED_EMAILS {
            self.company_of_email.clear();
        }
        for (email, company) in learned {
            self.company_of_email.entry(email).or_insert(company);
        }
        keys.sort_unstable();
        keys.dedup();
        self.held.extend(keys.iter().copied());
        Some((items, Held(keys)))
    }

    /// A batch ended (committed, failed, or its task died): its keys are
    /// free for the messages waiting on them.
    pub fn release(&mut self, held: Held) {
        for k in held.0 {
            self.held.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys known only as keys (neither e-mail nor company).
    fn k(keys: &[i64]) -> Keys {
        Keys { more: keys.to_vec(), ..Keys::default() }
    }

    fn batcher(items: &[(u32, &[i64])]) -> Batcher<u32> {
        let mut b = Batcher::default();
        for (item, keys) in items {
            b.push(*item, k(keys));
        }
        b
    }

    #[test]
    fn without_batches_in_flight_a_batch_is_the_first_messages_in_order() {
        let mut b = batcher(&[(1, &[10]), (2, &[10, 20]), (3, &[30]), (4, &[])]);
        let (items, held) = b.take(3, 3).unwrap();
        assert_eq!(items, vec![1, 2, 3]);
        assert_eq!(held, Held(vec![10, 20, 30]));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn a_message_sharing_a_key_with_a_batch_in_flight_waits_and_others_go() {
        let mut b = batcher(&[(1, &[10, 20])]);
        let (_, first) = b.take(10, 1).unwrap();
        for (item, keys) in [(2, vec![20, 30]), (3, vec![40]), (4, vec![50])] {
            b.push(item, k(&keys));
        }
        let (items, second) = b.take(10, 1).unwrap();
        assert_eq!(items, vec![3, 4], "lead 2 shares key 20 with the batch in flight");
        b.release(first);
        let (items, _) = b.take(10, 1).unwrap();
        assert_eq!(items, vec![2]);
        b.release(second);
        assert!(b.is_empty());
    }

    #[test]
    fn no_message_overtakes_an_earlier_waiting_one_that_shares_a_key() {
        let mut b = batcher(&[(1, &[10])]);
        let (_, first) = b.take(10, 1).unwrap();
        // 2 waits on key 10; 3 shares key 30 with 2, so waits behind it even
        // though nothing in flight holds 30; 4 shares nothing and goes.
        for (item, keys) in [(2, vec![10, 30]), (3, vec![30]), (4, vec![40])] {
            b.push(item, k(&keys));
        }
        let (items, _) = b.take(10, 1).unwrap();
        assert_eq!(items, vec![4]);
        assert_eq!(b.take(10, 1), None);
        b.release(first);
        let (items, _) = b.take(10, 1).unwrap();
        assert_eq!(items, vec![2, 3], "in arrival order, in one batch");
    }

    #[test]
    fn fewer_than_min_takes_nothing() {
        let mut b = batcher(&[(1, &[10])]);
        let (_, first) = b.take(10, 1).unwrap();
        b.push(2, k(&[10]));
        b.push(3, k(&[20]));
        assert_eq!(b.take(10, 2), None);
        assert_eq!(b.len(), 2, "nothing was taken");
        b.release(first);
        let (items, _) = b.take(10, 2).unwrap();
        assert_eq!(items, vec![2, 3]);
    }

    #[test]
    fn messages_without_keys_never_wait() {
        let mut b = batcher(&[(1, &[10])]);
        let (_, _first) = b.take(1, 1).unwrap();
        b.push(2, k(&[10]));
        b.push(3, k(&[]));
        assert_eq!(b.take(5, 1).unwrap().0, vec![3]);
    }

    #[test]
    fn a_lead_waits_on_the_company_its_e_mail_went_with_before() {
        let (email, company, other) = (1, 50, 60);
        let mut b: Batcher<u32> = Batcher::default();
        // Lead 1 links the contact of e-mail 1 to company 50's account.
        b.push(1, Keys { email: Some(email), company: Some(company), more: vec![] });
        let (_, first) = b.take(1, 1).unwrap();
        b.release(first);
        // A lead of company 50 converts...
        b.push(2, Keys { email: None, company: Some(company), more: vec![] });
        let (_, second) = b.take(1, 1).unwrap();
        // ...so a lead merging into that contact (another company) waits,
        // and one of another e-mail goes.
        b.push(3, Keys { email: Some(email), company: Some(other), more: vec![] });
        b.push(4, Keys { email: Some(2), company: Some(other + 1), more: vec![] });
        assert_eq!(b.take(5, 1).unwrap().0, vec![4]);
        b.release(second);
        assert_eq!(b.take(5, 1).unwrap().0, vec![3]);
    }

    #[test]
    fn keys_are_read_from_the_header_e_mail_company_then_more() {
        let k = |email, company, more: &[i64]| Keys { email, company, more: more.to_vec() };
        assert_eq!(Keys::from_header(&[-5, 7, 9, 11]), k(Some(-5), Some(7), &[9, 11]));
        assert_eq!(Keys::from_header(&[0, 7]), k(None, Some(7), &[]));
        assert_eq!(Keys::from_header(&[3, 0]), k(Some(3), None, &[]));
        assert_eq!(Keys::from_header(&[]), Keys::default(), "a message without the header");
    }
}
