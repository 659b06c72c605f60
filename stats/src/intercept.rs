//! Interception profiles: which classes of VM exit the hypervisor asks for.
//!
//! The hypervisor's command line selects them (`profile=`, `intercept=`,
//! `preempt=`, `ept=`); the probe guest reads the same words from its own
//! command line to know which exits to expect. Both use this one parser and
//! this one table, so "which reasons does an option enable" has one answer.
//!
//! Grammar (words of a command line; other words are not this module's):
//!
//! | word | meaning |
//! |---|---|
//! | `profile=minimal` | the default: only what the hypervisor must intercept (see [`BASE_REASONS`]) |
//! | `profile=kvm-like` | what KVM intercepts on a typical boot: [`Profile::KvmLike`] |
//! | `profile=all` | every class below, and `ept=lazy` |
//! | `intercept=NAME,NAME,...` | adds classes on top of the profile; `-NAME` removes one |
//! | `preempt=TICKS` / `preempt=off` | the VMX-preemption timer, re-armed every TICKS TSC ticks of guest time (reason 52). The timer does not count in C3 and deeper, so while it is on MONITOR/MWAIT are hidden from the guest's CPUID and MWAIT exits as a no-op (reason 36) |
//! | `ept=lazy` / `ept=eager` | EPT filled on demand from EPT violations, or built whole before the guest starts (the default) |
//! | `ept=off` | shadow paging: while the guest's paging is on, no EPT; page faults (reason 0), CR3 accesses (28), INVLPG (14) and INVPCID (58) exit, and the interrupt window (7) when an interrupt's delivery met the guest's #PF (see [`SHADOW_REASONS`]); the paging-off phases run on the eager identity EPT |
//!
//! The profile is the base wherever it stands on the line (the last
//! `profile=` wins); `intercept=` words then apply in order, so
//! `profile=all intercept=-pause` is everything but PAUSE. `preempt=` and
//! `ept=` override what the profile says.

use crate::reasons::ReasonSet;

/// A class of interception: one or more VM-execution controls, and the
/// exit reasons they enable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    Io,
    Msr,
    Hlt,
    Extint,
    Rdtsc,
    Invlpg,
    Cr3,
    Pause,
    Mwait,
    Dr,
    Desc,
    Rdpmc,
    Wbinvd,
}

/// One row of [`CLASSES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassInfo {
    pub class: Class,
    /// The name in `intercept=`.
    pub name: &'static str,
    /// The basic exit reasons this class enables. Some are enabled without
    /// it too (see [`BASE_REASONS`]): then the class makes more events
    /// exit, not a new reason.
    pub reasons: &'static [u16],
    /// What it intercepts, for the boot log and the documentation.
    pub what: &'static str,
}

/// How many classes there are.
pub const N_CLASSES: usize = 13;

/// Every class, in the order of the documentation.
pub static CLASSES: [ClassInfo; N_CLASSES] = [
    ClassInfo { class: Class::Io, name: "io", reasons: &[30], what: "every I/O port (IN, OUT, INS, OUTS)" },
    ClassInfo { class: Class::Msr, name: "msr", reasons: &[31, 32], what: "every MSR (RDMSR, WRMSR)" },
    ClassInfo { class: Class::Hlt, name: "hlt", reasons: &[12], what: "HLT (always on: HLT with interrupts off ends the run)" },
    ClassInfo { class: Class::Extint, name: "extint", reasons: &[1, 7], what: "external interrupts, acknowledged on exit and re-injected" },
    ClassInfo { class: Class::Rdtsc, name: "rdtsc", reasons: &[16, 51], what: "RDTSC and RDTSCP" },
    ClassInfo { class: Class::Invlpg, name: "invlpg", reasons: &[14, 58], what: "INVLPG and INVPCID" },
    ClassInfo { class: Class::Cr3, name: "cr3", reasons: &[28], what: "MOV to and from CR3" },
    ClassInfo { class: Class::Pause, name: "pause", reasons: &[40], what: "every PAUSE" },
    ClassInfo { class: Class::Mwait, name: "mwait", reasons: &[36, 39], what: "MONITOR and MWAIT (hidden from CPUID, as KVM does)" },
    ClassInfo { class: Class::Dr, name: "dr", reasons: &[29], what: "MOV to and from debug registers" },
    ClassInfo { class: Class::Desc, name: "desc", reasons: &[46, 47], what: "LGDT, LIDT, SGDT, SIDT, LLDT, LTR, SLDT, STR" },
    ClassInfo { class: Class::Rdpmc, name: "rdpmc", reasons: &[15], what: "RDPMC" },
    ClassInfo { class: Class::Wbinvd, name: "wbinvd", reasons: &[54], what: "WBINVD and WBNOINVD" },
];

/// The reason of the VMX-preemption timer (`preempt=`).
pub const PREEMPT_REASON: u16 = 52;
/// The MWAIT exit, which `preempt=` enables too (see [`Interception::reasons`]).
pub const MWAIT_REASON: u16 = 36;
/// The reasons shadow paging (`ept=off`) enables: exceptions (#PF is in the
/// exception bitmap), the interrupt window (an external interrupt whose
/// delivery met the guest's own #PF is given to the guest once it can take
/// one), INVLPG and INVPCID; CR access (28) is in [`BASE_REASONS`] and
/// grows by the CR3 loads and stores. EPT violations (48) stay possible, in
/// the guest's paging-off phases only.
pub const SHADOW_REASONS: [u16; 4] = [0, 7, 14, 58];

/// Reasons enabled in every profile: the exits VT-x makes unconditional
/// (CPUID, GETSEC, INVD, XSETBV, the VMX and TDX instructions, triple
/// fault, INIT, SIPI, task switch, EPT violation and misconfiguration,
/// VM-entry failures), HLT, and the few CR, I/O and MSR accesses the
/// hypervisor always watches (CR0.NE and CR4.VMXE; the ports that end the
/// run; IA32_FEATURE_CONTROL and the VMX capability MSRs).
pub const BASE_REASONS: ReasonSet = ReasonSet::of(&[
    2, 3, 4, 9, 10, 11, 12, 13, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 30, 31, 32, 33, 41, 48, 49, 50, 53, 55, 76, 77,
]);

impl Class {
    /// This class's row of [`CLASSES`].
    pub fn info(self) -> &'static ClassInfo {
        &CLASSES[self as usize]
    }

    /// The class named `name` in `intercept=`.
    pub fn from_name(name: &str) -> Option<Class> {
        CLASSES.iter().find(|c| c.name == name).map(|c| c.class)
    }
}

/// A set of classes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassSet(u16);

impl ClassSet {
    pub const EMPTY: ClassSet = ClassSet(0);
    /// Every class.
    pub const ALL: ClassSet = ClassSet((1 << N_CLASSES) - 1);

    pub const fn of(classes: &[Class]) -> ClassSet {
        let mut s = 0u16;
        let mut i = 0;
        while i < classes.len() {
            s |= 1 << classes[i] as u8;
            i += 1;
        }
        ClassSet(s)
    }
    pub fn insert(&mut self, c: Class) {
        self.0 |= 1 << c as u8;
    }
    pub fn remove(&mut self, c: Class) {
        self.0 &= !(1 << c as u8);
    }
    pub const fn contains(&self, c: Class) -> bool {
        self.0 & (1 << c as u8) != 0
    }
    pub const fn union(self, o: ClassSet) -> ClassSet {
        ClassSet(self.0 | o.0)
    }
    pub const fn minus(self, o: ClassSet) -> ClassSet {
        ClassSet(self.0 & !o.0)
    }
    /// The members, in [`CLASSES`] order.
    pub fn iter(self) -> impl Iterator<Item = &'static ClassInfo> {
        CLASSES.iter().filter(move |c| self.contains(c.class))
    }
}

/// A named starting set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Only what the hypervisor must intercept: HLT and [`BASE_REASONS`].
    #[default]
    Minimal,
    /// What KVM intercepts on a typical boot: every I/O port and MSR, HLT,
    /// external interrupts, MONITOR/MWAIT (hidden, so the guest idles with
    /// HLT), RDPMC and WBINVD, CR3 and INVLPG as KVM does without EPT, and
    /// EPT filled on demand.
    KvmLike,
    /// Every class, and `ept=lazy`.
    All,
}

impl Profile {
    pub const ALL_PROFILES: [Profile; 3] = [Profile::Minimal, Profile::KvmLike, Profile::All];

    pub const fn name(self) -> &'static str {
        match self {
            Profile::Minimal => "minimal",
            Profile::KvmLike => "kvm-like",
            Profile::All => "all",
        }
    }

    pub fn from_name(s: &str) -> Option<Profile> {
        Profile::ALL_PROFILES.into_iter().find(|p| p.name() == s)
    }

    /// The classes the profile starts with.
    pub const fn classes(self) -> ClassSet {
        use Class::*;
        match self {
            Profile::Minimal => ClassSet::of(&[Hlt]),
            Profile::KvmLike => ClassSet::of(&[Io, Msr, Hlt, Extint, Cr3, Invlpg, Mwait, Rdpmc, Wbinvd]),
            Profile::All => ClassSet::ALL,
        }
    }

    /// Whether the profile fills EPT on demand.
    pub const fn lazy_ept(self) -> bool {
        !matches!(self, Profile::Minimal)
    }
}

/// The interception a command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interception {
    pub profile: Profile,
    pub classes: ClassSet,
    /// Preemption-timer period in TSC ticks.
    pub preempt: Option<u64>,
    /// EPT filled on demand.
    pub lazy_ept: bool,
    /// Shadow paging (`ept=off`); `lazy_ept` is then false (the paging-off
    /// phases use the eager identity EPT).
    pub shadow: bool,
}

impl Default for Interception {
    fn default() -> Self {
        Interception::of_profile(Profile::Minimal)
    }
}

impl Interception {
    pub const fn of_profile(p: Profile) -> Interception {
        Interception { profile: p, classes: p.classes(), preempt: None, lazy_ept: p.lazy_ept(), shadow: false }
    }

    pub const fn has(&self, c: Class) -> bool {
        self.classes.contains(c)
    }

    /// The reasons this interception enables on a CPU with every control
    /// (the hypervisor's own answer also depends on the CPU: see
    /// `enabled_reasons` there).
    pub fn reasons(&self) -> ReasonSet {
        let mut s = BASE_REASONS;
        for c in self.classes.iter() {
            for &r in c.reasons {
                s.insert(r);
            }
        }
        if self.preempt.is_some() {
            s.insert(PREEMPT_REASON);
            // MWAIT exits while the timer is on (the timer stops in deep
            // C-states): see the hypervisor's `caps::choose`.
            s.insert(MWAIT_REASON);
        }
        if self.shadow {
            for r in SHADOW_REASONS {
                s.insert(r);
            }
        }
        s
    }

    /// Whether `reason` is enabled only because of a class or option that
    /// is off here: the leaves must then report all zeros for it.
    pub fn reason_off(&self, reason: u16) -> bool {
        !self.reasons().contains(reason as u32)
    }
}

/// Longest and shortest preemption-timer period accepted.
pub const PREEMPT_MIN: u64 = 1000;
pub const PREEMPT_MAX: u64 = u32::MAX as u64;

/// A bad interception word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterceptError<'a> {
    /// `intercept=` names no class called this.
    UnknownClass(&'a str),
    /// `profile=` names no profile called this.
    UnknownProfile(&'a str),
    /// `intercept=` with an empty name (`intercept=` or `io,,msr`).
    EmptyName,
    /// `intercept=-hlt`: HLT interception cannot be turned off.
    HltRequired,
    BadPreempt(&'a str),
    BadEpt(&'a str),
}

impl core::fmt::Display for InterceptError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InterceptError::UnknownClass(n) => {
                write!(f, "unknown interception '{n}' in intercept= (known:")?;
                for c in CLASSES.iter() {
                    write!(f, " {}", c.name)?;
                }
                f.write_str("; -NAME removes one)")
            }
            InterceptError::UnknownProfile(n) => write!(f, "unknown profile '{n}' (known: minimal, kvm-like, all)"),
            InterceptError::EmptyName => f.write_str("empty name in intercept= (expected a comma-separated list such as io,msr,-pause)"),
            InterceptError::HltRequired => {
                f.write_str("HLT interception cannot be turned off (HLT with interrupts off is how a guest ends its run)")
            }
            InterceptError::BadPreempt(v) => {
                write!(f, "bad value '{v}' for preempt= (expected 'off' or TSC ticks from {PREEMPT_MIN} to {PREEMPT_MAX})")
            }
            InterceptError::BadEpt(v) => write!(f, "bad value '{v}' for ept= (expected lazy, eager or off)"),
        }
    }
}

/// Collects interception words in command-line order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builder {
    profile: Profile,
    add: ClassSet,
    remove: ClassSet,
    preempt: Option<Option<u64>>,
    /// `ept=`: Some(lazy) for lazy or eager, None for off.
    ept: Option<Option<bool>>,
}

impl Builder {
    /// Takes one `key=value` word. `Ok(false)`: not an interception word.
    pub fn word<'a>(&mut self, key: &str, value: &'a str) -> Result<bool, InterceptError<'a>> {
        match key {
            "profile" => self.profile = Profile::from_name(value).ok_or(InterceptError::UnknownProfile(value))?,
            "intercept" => {
                for item in value.split(',') {
                    let (off, name) = match item.strip_prefix('-') {
                        Some(n) => (true, n),
                        None => (false, item),
                    };
                    if name.is_empty() {
                        return Err(InterceptError::EmptyName);
                    }
                    let c = Class::from_name(name).ok_or(InterceptError::UnknownClass(name))?;
                    if off {
                        if c == Class::Hlt {
                            return Err(InterceptError::HltRequired);
                        }
                        self.remove.insert(c);
                        self.add.remove(c);
                    } else {
                        self.add.insert(c);
                        self.remove.remove(c);
                    }
                }
            }
            "preempt" => {
                self.preempt = Some(match value {
                    "off" => None,
                    v => match parse_ticks(v) {
                        Some(t) if (PREEMPT_MIN..=PREEMPT_MAX).contains(&t) => Some(t),
                        _ => return Err(InterceptError::BadPreempt(v)),
                    },
                })
            }
            "ept" => {
                self.ept = Some(match value {
                    "lazy" => Some(true),
                    "eager" => Some(false),
                    "off" => None,
                    v => return Err(InterceptError::BadEpt(v)),
                })
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    pub fn finish(self) -> Interception {
        let base = Interception::of_profile(self.profile);
        Interception {
            profile: self.profile,
            classes: base.classes.union(self.add).minus(self.remove),
            preempt: self.preempt.unwrap_or(base.preempt),
            lazy_ept: match self.ept {
                None => base.lazy_ept,
                Some(lazy) => lazy.unwrap_or(false),
            },
            shadow: self.ept == Some(None),
        }
    }
}

/// A decimal number, or hexadecimal with `0x`.
fn parse_ticks(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The interception named by the `key=value` words of `line`; other words
/// are ignored (the probe's command line has its own options too).
pub fn from_cmdline(line: &str) -> Result<Interception, InterceptError<'_>> {
    let mut b = Builder::default();
    for w in line.split_ascii_whitespace() {
        if let Some((k, v)) = w.split_once('=') {
            b.word(k, v)?;
        }
    }
    Ok(b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn table_is_in_class_order_with_defined_reasons() {
        for (i, c) in CLASSES.iter().enumerate() {
            assert_eq!(c.class as usize, i);
            assert_eq!(Class::from_name(c.name), Some(c.class));
            for &r in c.reasons {
                assert!(crate::reasons::is_defined(r as u32), "{} enables undefined reason {r}", c.name);
            }
        }
        assert_eq!(ClassSet::ALL.iter().count(), CLASSES.len());
    }

    #[test]
    fn profiles() {
        let m = from_cmdline("").unwrap();
        assert_eq!(m, Interception::default());
        assert_eq!(m.classes, ClassSet::of(&[Class::Hlt]));
        assert!(!m.lazy_ept && m.preempt.is_none());
        assert_eq!(m.reasons(), BASE_REASONS);
        let k = from_cmdline("profile=kvm-like").unwrap();
        for c in [Class::Io, Class::Msr, Class::Hlt, Class::Extint, Class::Cr3, Class::Invlpg] {
            assert!(k.has(c), "{c:?}");
        }
        for c in [Class::Rdtsc, Class::Pause, Class::Dr, Class::Desc] {
            assert!(!k.has(c), "{c:?}");
        }
        assert!(k.lazy_ept);
        let a = from_cmdline("profile=all").unwrap();
        assert_eq!(a.classes, ClassSet::ALL);
        assert!(a.lazy_ept && a.preempt.is_none());
        for r in [1, 7, 14, 15, 16, 29, 36, 39, 40, 46, 47, 51, 54, 58] {
            assert!(a.reasons().contains(r) && !m.reasons().contains(r), "reason {r}");
        }
    }

    #[test]
    fn intercept_adds_and_removes_in_order() {
        let i = from_cmdline("intercept=io,msr,hlt,extint,rdtsc,invlpg,cr3,pause,mwait,dr,desc,rdpmc,wbinvd").unwrap();
        assert_eq!(i.classes, ClassSet::ALL);
        assert!(!i.lazy_ept, "intercept= does not change EPT");
        let i = from_cmdline("intercept=rdtsc profile=kvm-like").unwrap();
        assert!(i.has(Class::Rdtsc) && i.has(Class::Io), "the profile is the base wherever it stands");
        let i = from_cmdline("profile=all intercept=-pause,-io").unwrap();
        assert_eq!(i.classes, ClassSet::ALL.minus(ClassSet::of(&[Class::Pause, Class::Io])));
        let i = from_cmdline("intercept=io intercept=-io").unwrap();
        assert!(!i.has(Class::Io));
        let i = from_cmdline("intercept=-io,io").unwrap();
        assert!(i.has(Class::Io));
        let i = from_cmdline("profile=all ept=eager preempt=5000").unwrap();
        assert!(!i.lazy_ept);
        assert_eq!(i.preempt, Some(5000));
        assert!(i.reasons().contains(52));
        assert_eq!(from_cmdline("preempt=0x10000 preempt=off").unwrap().preempt, None);
        assert_eq!(from_cmdline("ept=lazy").unwrap().classes, ClassSet::of(&[Class::Hlt]));
        // Words of other options are not ours.
        let mut b = Builder::default();
        assert_eq!(b.word("iters", "5"), Ok(false));
    }

    #[test]
    fn errors_name_the_problem() {
        let e = from_cmdline("intercept=io,frob").unwrap_err();
        assert_eq!(e, InterceptError::UnknownClass("frob"));
        let s = e.to_string();
        assert!(s.contains("'frob'") && s.contains("wbinvd") && s.contains("extint"), "{s}");
        assert_eq!(from_cmdline("profile=fast").unwrap_err(), InterceptError::UnknownProfile("fast"));
        assert_eq!(from_cmdline("intercept=").unwrap_err(), InterceptError::EmptyName);
        assert_eq!(from_cmdline("intercept=io,,msr").unwrap_err(), InterceptError::EmptyName);
        assert_eq!(from_cmdline("intercept=-").unwrap_err(), InterceptError::EmptyName);
        assert_eq!(from_cmdline("intercept=-hlt").unwrap_err(), InterceptError::HltRequired);
        for bad in ["999", "soon", "", "4294967296", "-1"] {
            let line = std::format!("preempt={bad}");
            assert_eq!(from_cmdline(&line).unwrap_err(), InterceptError::BadPreempt(bad), "{bad}");
        }
        assert_eq!(from_cmdline("ept=never").unwrap_err(), InterceptError::BadEpt("never"));
        assert!(InterceptError::BadEpt("x").to_string().contains("lazy, eager or off"));
        assert!(InterceptError::BadPreempt("x").to_string().contains("1000"));
    }

    #[test]
    fn ept_off_is_shadow_paging() {
        let k = from_cmdline("profile=kvm-like ept=off").unwrap();
        assert!(k.shadow && !k.lazy_ept, "the paging-off phases use the eager EPT");
        assert!(k.has(Class::Io), "composes with the profile");
        for r in [0u16, 14, 28, 58, 48] {
            assert!(k.reasons().contains(r as u32), "reason {r}");
        }
        let m = from_cmdline("ept=off").unwrap();
        assert_eq!(m.classes, ClassSet::of(&[Class::Hlt]));
        assert!(!m.reason_off(0) && !m.reason_off(14) && !m.reason_off(58));
        assert!(m.reason_off(1) && m.reason_off(16), "other classes stay off");
        assert!(Interception::default().reason_off(0));
        // The last ept= wins.
        let l = from_cmdline("ept=off ept=lazy").unwrap();
        assert!(!l.shadow && l.lazy_ept);
        assert!(!from_cmdline("ept=lazy ept=off").unwrap().lazy_ept);
    }

    #[test]
    fn off_reasons() {
        let m = Interception::default();
        // Reasons of classes that are off and not in the base set.
        for r in [1u16, 7, 14, 15, 16, 29, 36, 39, 40, 46, 47, 51, 52, 54, 58] {
            assert!(m.reason_off(r), "{r}");
        }
        // io, msr, cr3 and hlt widen reasons that are always on.
        for r in [12u16, 28, 30, 31, 32, 48] {
            assert!(!m.reason_off(r), "{r}");
        }
    }
}
